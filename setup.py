"""Builds the kit's one compiled part: the CPU decode kernel, an XLA FFI handler
(`kit/attention/cpu/decode.cc`, loaded by `kit.attention.cpu_kernels`).

Everything else is in pyproject.toml. The kernel is optional: where it does not build
(no C++ compiler, a platform it was not written for), the install goes on without it
and `implementation=None` keeps the plain jax.numpy path for a decode step.
The XLA FFI headers come with jaxlib (`jaxlib/include`), a build requirement.
"""

import importlib.util
import os

from setuptools import Extension, setup


def jaxlib_include() -> str:
    # Found without importing jaxlib (which would import numpy and load XLA).
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(next(iter(spec.submodule_search_locations)), "include")


setup(
    ext_modules=[
        Extension(
            "kit.attention._decode_cpu",
            sources=["kit/attention/cpu/decode.cc", "kit/attention/cpu/flash.cc"],
            depends=["kit/attention/cpu/vec.h"],
            include_dirs=[jaxlib_include()],
            language="c++",
            # -ffp-contract=fast: a * b + c as one FMA where the CPU has it. The AVX2
            # version is picked at run time by the function's target_clones.
            extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=fast", "-Wno-psabi"],
            optional=True,
        )
    ]
)
