"""Installing lineserver: a wheel in a fresh virtualenv, and `make run`'s.

`pip install .` gives twistd and twist the plugin, with no warning from
the build; `make run` installs the server and its runtime dependencies
only, not the test tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).parent.parent


def clean_environment() -> dict[str, str]:
    """
    This environment without what would make the fresh virtualenv see our
    packages (trial -j sets PYTHONPATH for its workers): pip would then find
    Twisted installed already and leave the venv without twistd.
    """
    hidden = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONUSERBASE"}
    return {k: v for k, v in os.environ.items() if k not in hidden}


class PackagingTests(TestCase):
    def test_wheel_installs_the_plugin(self) -> None:
        """
        The wheel ships twisted/plugins/lineserver_plugin.py and no
        twisted/plugins/__init__.py (which would replace Twisted's own), and
        in a fresh virtualenv both twistd and twist find the plugin.  The
        build warns about nothing (setuptools deprecated the old form of
        the licence field), and the wheel declares the licence in SPDX.
        """
        env = clean_environment()
        with tempfile.TemporaryDirectory() as tmp:
            wheels = Path(tmp, "wheels")
            built = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--wheel-dir",
                    str(wheels),
                    str(ROOT),
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=tmp,
                env=env,
            )
            self.assertNotIn("BuildBackendWarning", built.stderr)
            self.assertNotIn("project.license", built.stderr)
            (wheel,) = wheels.glob("lineserver-*.whl")
            archive = zipfile.ZipFile(wheel)
            names = archive.namelist()
            (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
            metadata = archive.read(metadata_name).decode()
            self.assertIn("License-Expression: MIT", metadata.splitlines())
            self.assertIn("twisted/plugins/lineserver_plugin.py", names)
            self.assertNotIn("twisted/plugins/__init__.py", names)
            self.assertNotIn("twisted/__init__.py", names)

            venv = Path(tmp, "venv")
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, env=env
            )
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)],
                check=True,
                capture_output=True,
                cwd=tmp,
                env=env,
            )
            for runner, args in (
                ("twistd", ["lineserver", "--help"]),
                ("twist", ["lineserver", "--help"]),
            ):
                done = subprocess.run(
                    [str(venv / "bin" / runner), *args],
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    env=env,
                    timeout=60,
                )
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn("--max-line-length", done.stdout)


class MakeRunTests(TestCase):
    def test_runtime_only(self) -> None:
        """
        The virtualenv C{make run} builds (from a copy of the checkout) has
        the server, which starts far enough to print its version, and none
        of the test tools.
        """
        env = clean_environment()
        with tempfile.TemporaryDirectory() as tmp:
            checkout = Path(tmp, "checkout")
            checkout.mkdir()
            for name in ("pyproject.toml", "Makefile", "README.md"):
                shutil.copy(ROOT / name, checkout / name)
            ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
            for name in ("lineserver", "twisted"):
                shutil.copytree(ROOT / name, checkout / name, ignore=ignore)
            dry_run = subprocess.run(
                ["make", "-n", "run"],
                capture_output=True,
                text=True,
                cwd=checkout,
                env=env,
                check=True,
            )
            self.assertNotIn("[test]", dry_run.stdout)
            self.assertNotIn("test-requirements", dry_run.stdout)
            made = subprocess.run(
                ["make", ".venv/.runtime-stamp", f"PYTHON={sys.executable}"],
                capture_output=True,
                text=True,
                cwd=checkout,
                env=env,
                timeout=600,
            )
            self.assertEqual(made.returncode, 0, made.stdout + made.stderr)
            self.assertNotIn("project.license", made.stderr)
            bin_dir = checkout / ".venv" / "bin"
            version = subprocess.run(
                [str(bin_dir / "twistd"), "lineserver", "--version"],
                capture_output=True,
                text=True,
                cwd=checkout,
                env=env,
                timeout=60,
            )
            self.assertEqual(version.returncode, 0, version.stderr)
            self.assertTrue(version.stdout.startswith("lineserver "), version.stdout)
            for tool in ("ruff", "mypy", "pytest"):
                self.assertFalse((bin_dir / tool).exists(), tool)
            missing = subprocess.run(
                [str(bin_dir / "python"), "-c", "import hypothesis"],
                capture_output=True,
                env=env,
                timeout=60,
            )
            self.assertNotEqual(missing.returncode, 0)
