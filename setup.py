"""The one build step pyproject.toml cannot declare: a wheel carries the
shim and the test guests prebuilt (pyvmm/prebuild.py), so installing it
needs no gcc; building it does.  Everything else is in pyproject.toml."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# Run on the copy build_py has just laid out (sources, headers, linker
# scripts as installed, so the keys match at run time), imported from there
# and not from any other pyvmm this Python may have installed.
PREBUILD = """import sys
sys.path.insert(0, sys.argv[1])
import pyvmm
from pathlib import Path
if Path(pyvmm.__file__).resolve().parent != Path(sys.argv[1], "pyvmm").resolve():
    sys.exit(f"prebuild: imported pyvmm from {pyvmm.__file__}, not from {sys.argv[1]}")
from pyvmm.prebuild import prebuild
from pyvmm.toolchain import ToolchainError
try:
    prebuild()
except ToolchainError as e:
    sys.exit(f"prebuild: {e}")
"""


class build_py_prebuilt(build_py):
    def run(self):
        super().run()
        if self.editable_mode:      # an editable install builds on first use, as a checkout does
            return
        lib = Path(self.build_lib).resolve()
        # nothing left from an earlier build of other sources
        shutil.rmtree(lib / "pyvmm" / "prebuilt", ignore_errors=True)
        # a cache of its own: what the wheel ships is built here, by this gcc
        with tempfile.TemporaryDirectory(prefix="pyvmm-prebuild-") as cache:
            done = subprocess.run([sys.executable, "-c", PREBUILD, str(lib)],
                                  env=dict(os.environ, PYVMM_CACHE=cache))
        if done.returncode:
            sys.exit("setup.py: building the wheel's prebuilt shim and test guests failed (see above)")

    def get_outputs(self, include_bytecode=True):
        prebuilt = Path(self.build_lib) / "pyvmm" / "prebuilt"
        return super().get_outputs(include_bytecode) + sorted(
            str(p) for p in prebuilt.rglob("*") if p.is_file())


setup(cmdclass={"build_py": build_py_prebuilt})
