"""Package metadata: the declared dependency floors match what the code relies on and what is installed."""
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared(name: str) -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (requirement,) = [r for r in map(Requirement, dependencies) if r.name == name]
    return requirement


def test_transformers_floor_is_5_and_installed_version_satisfies_it():
    """The recipes pass warmup_ratio as TrainingArguments(warmup_steps=<ratio>): a ratio only from transformers 5.0
    on (4.x reads it as a step count), so 4.x must not satisfy the requirement."""
    requirement = declared("transformers")
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    assert floors and min(floors).major >= 5, requirement
    assert not requirement.specifier.contains("4.57.6")
    assert requirement.specifier.contains(metadata.version("transformers"), prereleases=True), requirement
