"""DeepSeek-V3 in JAX / Flax NNX.

With DSV3_CHECK_SHAPES=1 in the environment (the test suite sets it, for its subprocesses too),
every function and dataclass of the package (but the `dsv3` command's argument parsing, cli.py) and
of its kernels is checked at call time against its annotations by jaxtyping with beartype: array
ranks, dtypes and the named dims of `Float[Array, "B T D"]`, consistent across one call's arguments
and result. Inside `jit` a check runs once per trace, on the tracers' shapes.
"""

import os

if os.environ.get("DSV3_CHECK_SHAPES") == "1":
    import pkgutil

    from beartype import BeartypeConf, beartype
    from jaxtyping import install_import_hook

    # PEP 484's numeric tower: an int is a valid float (timeout_s=5), as the annotations mean it.
    typechecked = beartype(conf=BeartypeConf(is_pep484_tower=True))
    # Not cli.py: `python -m dsv3_jax.cli` loads it through runpy, which caches the hook's rewrite of
    # it as the plain bytecode a later unchecked `python -m dsv3_jax.cli` would then run.
    _checked = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "cli"]
    install_import_hook(_checked + ["pallas_kernels"], "dsv3_jax.typechecked")
