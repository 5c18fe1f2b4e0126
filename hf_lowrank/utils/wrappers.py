"""Finding an optimizer inside the wrappers around it (accelerate's, layer-wise, DeepSpeed's ZeRO)."""


def find_optimizer(optimizer, predicate):
    """The first of ``optimizer``, ``optimizer.optimizer``, ... for which ``predicate`` holds, or None."""
    while optimizer is not None and not predicate(optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer
