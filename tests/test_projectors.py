import numpy as np
import pytest
import scipy.fft
import torch

from hf_lowrank.projectors import (
    PROJECTORS, DCTProjector, SVDProjector, dct_matrix, get_projector, resolve_side,
)


SHAPES = [(24, 40), (40, 24), (32, 32)]
NAMES = sorted(PROJECTORS)


def _grad(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_basis_is_orthonormal_and_shapes_follow_side(name, shape):
    proj = get_projector(name, shape, 8)
    g = _grad(shape)
    proj.update(g)
    q = proj.basis()
    assert q.shape == (proj.dim, 8)
    torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)
    low = proj.project(g)
    assert low.shape == ((8, shape[1]) if proj.side == "left" else (shape[0], 8))
    assert proj.project_back(low).shape == g.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_full_rank_reconstructs_exactly(name, shape, proj_type):
    # rank >= min(m, n) (and square reverse_std, which breaks galore-torch) must work and be exact.
    proj = get_projector(name, shape, 10_000, proj_type=proj_type)
    assert proj.rank == proj.dim
    g = _grad(shape, 1)
    proj.update(g)
    torch.testing.assert_close(proj.project_back(proj.project(g)), g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "shape,proj_type,side",
    [((10, 20), "std", "left"), ((20, 10), "std", "right"), ((10, 10), "std", "right"),
     ((10, 20), "reverse_std", "right"), ((20, 10), "reverse_std", "left"), ((10, 10), "reverse_std", "left"),
     ((10, 20), "left", "left"), ((10, 20), "right", "right")],
)
def test_side_selection(shape, proj_type, side):
    assert resolve_side(shape, proj_type) == side
    assert SVDProjector(shape, 4, proj_type).side == side


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100])
def test_dct_matrix_matches_scipy(size):
    expected = scipy.fft.dct(np.eye(size), norm="ortho", axis=0)
    np.testing.assert_allclose(dct_matrix(size).double().numpy(), expected, atol=1e-6)


def test_dct_selects_the_columns_carrying_the_gradient():
    m, n = 16, 48  # wide -> left side, basis over the 16 rows
    basis = dct_matrix(m).T
    chosen = [2, 5, 11]
    g = sum((i + 1.0) * torch.outer(basis[:, k], torch.randn(n)) for i, k in enumerate(chosen))
    proj = DCTProjector((m, n), 3)
    proj.update(g)
    assert proj.state_dict()["indices"].tolist() == chosen
    assert proj.state_dict()["indices"].dtype == torch.int32
    torch.testing.assert_close(proj.project_back(proj.project(g)), g, atol=1e-4, rtol=1e-4)


def test_svd_matches_galore_torch_projector():
    from galore_torch.galore_projector import GaLoreProjector

    for shape in SHAPES:
        g = _grad(shape, 2)
        ours = SVDProjector(shape, 6)
        ours.update(g)
        ref = GaLoreProjector(6, update_proj_gap=1, scale=1.0, proj_type="std")
        low_ref = ref.project(g, 0)
        torch.testing.assert_close(ours.project(g), low_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.project_back(low_ref), ref.project_back(low_ref), atol=1e-5, rtol=1e-5)


def test_sign_alignment_undoes_lapack_sign_flips(monkeypatch):
    g = _grad((20, 30), 3)
    proj = SVDProjector((20, 30), 5, sign_convention="align")
    proj.update(g)
    first = proj.basis().clone()
    # the first fit is canonical: each vector's largest-magnitude entry is positive
    assert (first.gather(0, first.abs().argmax(0, keepdim=True)) > 0).all()
    real_svd = torch.linalg.svd

    def flipped_svd(a, full_matrices=False):
        u, s, vh = real_svd(a, full_matrices=full_matrices)
        return -u, s, -vh

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    proj.update(g)
    torch.testing.assert_close(proj.basis(), first)


def test_randomized_recovers_low_rank_subspace_and_is_seeded():
    u = torch.linalg.qr(_grad((60, 6), 4)).Q
    g = u @ _grad((6, 80), 5)  # exact rank 6
    a, b = get_projector("randomized", g.shape, 6, seed=7), get_projector("randomized", g.shape, 6, seed=7)
    a.update(g)
    b.update(g)
    torch.testing.assert_close(a.basis(), b.basis())
    torch.testing.assert_close(a.project_back(a.project(g)), g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_is_tensor_only(name, tmp_path):
    shape = (24, 40)
    proj = get_projector(name, shape, 8)
    g = _grad(shape, 6)
    proj.update(g)
    proj.update(g * 2)
    path = tmp_path / "proj.pt"
    torch.save(proj.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = get_projector(name, shape, 8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.project(g), proj.project(g))
    assert fresh.state_bytes() == proj.state_bytes()


def test_state_sizes_dct_indices_random_seed():
    shape = (512, 1024)
    svd, dct, rnd = (get_projector(n, shape, 64) for n in ("svd", "dct", "random"))
    g = _grad(shape, 7)
    for p in (svd, dct, rnd):
        p.update(g)
    assert svd.state_bytes() == 512 * 64 * 4
    assert dct.state_bytes() == 64 * 4
    assert rnd.state_bytes() == 16  # the draw counter and the generator's device type


def test_quantized_projector_is_int4_packed_and_close():
    shape = (128, 256)
    g = _grad(shape, 8)
    dense = get_projector("svd", shape, 32)
    quant = get_projector("svd", shape, 32, quant_bits=4, quant_group_size=256)
    dense.update(g)
    quant.update(g)
    state = quant.state_dict()
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == 128 * 32 // 2
    assert quant.state_bytes() < dense.state_bytes() / 7
    err = (quant.basis() - dense.basis()).abs().max() / dense.basis().abs().max()
    assert err < 0.1
    with pytest.raises(TypeError, match="nothing to quantise"):
        get_projector("dct", shape, 8, quant_bits=4)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="rank"):
        get_projector("svd", (4, 4), 0)
    with pytest.raises(ValueError, match="rank"):
        get_projector("svd", (4, 4), 2.5)
    with pytest.raises(ValueError, match="proj_type"):
        get_projector("svd", (4, 4), 2, proj_type="full")
    with pytest.raises(ValueError, match="2-D"):
        get_projector("svd", (4, 4, 4), 2)
    with pytest.raises(ValueError, match="Unknown projector 'pca'.*available"):
        get_projector("pca", (4, 4), 2)
    with pytest.raises(TypeError, match=r"does not take option\(s\) \[.seed.\]; it accepts"):
        get_projector("dct", (4, 4), 2, seed=3)
    proj = get_projector("svd", (4, 6), 2)
    with pytest.raises(ValueError, match="shape"):
        proj.update(torch.zeros(6, 4))
    with pytest.raises(RuntimeError, match="before update"):
        proj.basis()


def test_dense_basis_is_stored_in_the_gradient_dtype():
    g = _grad((24, 40), 9).bfloat16()
    for name in ("svd", "randomized"):
        proj = get_projector(name, g.shape, 8)
        proj.update(g)
        assert proj.basis().dtype == torch.bfloat16
        assert proj.state_bytes() == 24 * 8 * 2 + (8 if name == "randomized" else 0)
        assert proj.project(g).dtype == torch.bfloat16


def test_random_projector_sizes_state_on_meta_without_drawing():
    proj = get_projector("random", (4096, 11008), 1024)
    proj.update(torch.empty(4096, 11008, device="meta"))
    assert proj.basis().device.type == "meta" and proj.state_bytes() == 16


def test_random_projector_resumes_on_its_generator_device_type_or_says_why_it_cannot():
    """A resumed run draws on the device type that drew the first basis (a CUDA generator's numbers differ from
    the CPU's); where that type is missing, loading is a clear error. A state without the key was drawn on CPU."""
    from hf_lowrank.projectors.random import GENERATOR_DEVICE_TYPES

    proj = get_projector("random", (24, 40), 4, seed=3)
    proj.update(torch.zeros(24, 40))
    state = proj.state_dict()
    assert GENERATOR_DEVICE_TYPES[int(state["generator_device"])] == "cpu"
    legacy = get_projector("random", (24, 40), 4, seed=3)
    legacy.load_state_dict({"draw": state["draw"]})
    assert torch.equal(legacy.basis(), proj.basis())
    missing = next((t for t in GENERATOR_DEVICE_TYPES[1:] if not getattr(torch, t).is_available()), None)
    if missing is None:
        pytest.skip("every accelerator type is available")
    foreign = {**state, "generator_device": torch.tensor(GENERATOR_DEVICE_TYPES.index(missing))}
    with pytest.raises(RuntimeError, match=f"drawn with a {missing} generator.*Resume where {missing}"):
        get_projector("random", (24, 40), 4, seed=3).load_state_dict(foreign)


def test_subspace_iteration_starts_exact_then_tracks_the_subspace_from_the_previous_basis():
    torch.manual_seed(0)
    m, n, r = 96, 160, 8
    u, v = torch.linalg.qr(torch.randn(m, 40)).Q, torch.linalg.qr(torch.randn(n, 40)).Q
    spectrum = torch.cat([torch.linspace(10, 5, r), torch.linspace(0.5, 0.1, 40 - r)])  # a gap at the rank
    grad = (u * spectrum) @ v.T
    tracked, exact = get_projector("subspace", (m, n), r), get_projector("svd", (m, n), r)
    tracked.update(grad)
    exact.update(grad)
    torch.testing.assert_close(tracked.basis().abs(), exact.basis().abs())  # first fit: the exact SVD
    for step in range(3):
        grad = grad + 0.05 * torch.randn(m, n)
        tracked.update(grad)
        exact.update(grad)
        overlap = (tracked.basis().T @ exact.basis()).pow(2).sum() / r
        assert overlap > 0.99
        leading = (tracked.basis()[:, 0] @ exact.basis()[:, 0]).abs()
        assert leading > 0.99  # ordered like singular vectors
    resumed = get_projector("subspace", (m, n), r)
    resumed.load_state_dict({k: v.clone() for k, v in tracked.state_dict().items()})
    grad = grad + 0.05 * torch.randn(m, n)
    tracked.update(grad)
    resumed.update(grad)
    assert torch.equal(resumed.basis(), tracked.basis())
    with pytest.raises(ValueError, match="`iterations` must be an int >= 1"):
        get_projector("subspace", (m, n), r, iterations=0)
