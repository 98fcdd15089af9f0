"""Build the Cython extension(s): patronus/*.pyx compiled with csrc/*.c.

The C sources and the ABI header in csrc/ are shared with the bpf/ programs;
the extension includes them directly so both data planes read one layout.
"""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
CSRC = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c"))

extensions = [
    Extension(
        "patronus._fast",
        sources=["patronus/_fast.pyx", *CSRC],
        include_dirs=["csrc"],
        depends=[str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.h")],
        extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
