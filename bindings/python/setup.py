"""Everything is in pyproject.toml; this file only bundles the shared library on request:
`PHENOCORE_BUNDLE_LIB=/path/to/libphenocore.so pip wheel bindings/python` copies it into the package,
and the wheel is then tagged for this platform instead of `py3-none-any`."""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

BUNDLE = os.environ.get("PHENOCORE_BUNDLE_LIB")


LIB_NAMES = ("libphenocore.so", "libphenocore.dylib", "phenocore.dll")


class BuildPyBundlingLib(build_py):
    def run(self):
        super().run()
        package = Path(self.build_lib) / "phenocore"
        for name in LIB_NAMES:  # a library left in build/ by an earlier bundling build
            (package / name).unlink(missing_ok=True)
        if BUNDLE:
            lib = Path(BUNDLE)
            if lib.name not in LIB_NAMES or not lib.is_file():
                raise SystemExit(f"PHENOCORE_BUNDLE_LIB={BUNDLE!r} must be an existing {' / '.join(LIB_NAMES)}")
            shutil.copy2(lib, package / lib.name)


class PlatformDistribution(Distribution):
    def has_ext_modules(self):
        return bool(BUNDLE)


setup(cmdclass={"build_py": BuildPyBundlingLib}, distclass=PlatformDistribution)
