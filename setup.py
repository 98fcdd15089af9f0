"""Build the Cython extension(s) and lay out the C sources as package data.

patronus/*.pyx is compiled with csrc/*.c. The C sources and headers in csrc/
are shared with the bpf/ programs, which the XDP backend compiles at run time
with BCC: build_py copies bpf/ and csrc/ (every *.c and *.h) into the built
package as patronus/_src/{bpf,csrc}, where patronus/_sources.py finds them in
an installed copy. An editable install reads them from the checkout instead.
Everything else (packages, package data, metadata) is in pyproject.toml.
"""
import shutil
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
SOURCE_DIRS = ("bpf", "csrc")  # copied to patronus/_src/<dir>
SOURCE_GLOBS = ("*.c", "*.h")


def _rel(paths):
    return sorted(str(p.relative_to(HERE)) for p in paths)


class BuildPyWithSources(build_py):
    """build_py, plus bpf/ and csrc/ copied into patronus/_src/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # the checkout's own bpf/ and csrc/ are used
            return
        for name in SOURCE_DIRS:
            src = HERE / name
            files = [p for g in SOURCE_GLOBS for p in src.glob(g)]
            if not files:
                raise SystemExit(f"setup.py: no {' or '.join(SOURCE_GLOBS)} files in {src}: "
                                 f"the sdist or checkout is incomplete")
            dst = Path(self.build_lib) / "patronus" / "_src" / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / f.name)

    def get_outputs(self, include_bytecode=True):
        out = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            for name in SOURCE_DIRS:
                out += [str(Path(self.build_lib) / "patronus" / "_src" / name / p.name)
                        for g in SOURCE_GLOBS for p in (HERE / name).glob(g)]
        return out


extensions = [
    Extension(
        "patronus._fast",
        sources=["patronus/_fast.pyx", *_rel((HERE / "csrc").glob("*.c"))],
        include_dirs=["csrc"],
        depends=_rel([*(HERE / "csrc").glob("*.h"), *(HERE / "patronus").glob("*.pxd"),
                      *(HERE / "patronus").glob("*.pxi")]),
        extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    ),
    # BFD sessions, compiled (patronus.failover.bfd is the specification)
    Extension("patronus._bfd", sources=["patronus/_bfd.pyx"], extra_compile_args=["-O3", "-Wno-unused-function"]),
]

setup(
    cmdclass={"build_py": BuildPyWithSources},
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
