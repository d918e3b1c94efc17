"""transformers' own model-test mixins (`ModelTesterMixin`, `ConfigTester`), taken from the installed release's sdist.

Nothing of transformers' test suite is committed here. At test time `load_upstream_tests()`:

1. downloads the sdist of the *installed* transformers release with pip
   (`pip download --no-binary :all: --no-deps transformers==<version>`) into
   `$HF_ATTN_VARIANTS_CACHE/transformers-sdist/<version>/` (default `~/.cache/hf-attn-variants/...`), reused when
   present;
2. extracts its top-level `tests/*.py` files next to it (the sdist ships only those);
3. imports that folder as the package `hf_upstream_tests`, with this folder's `standins/` registered for the modules
   those files import that the sdist lacks (`generation.test_utils`, `exporters.test_export`,
   `utils.test_configuration_utils`) plus our own `causal_lm_tester`.

Every step writes to a temporary name and renames, so an interrupted download or extraction never sticks. Any failure
raises `UpstreamTestsUnavailable` with a one-line reason (the test module turns that into a module-level skip).
"""

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

PACKAGE = "hf_upstream_tests"
STANDINS = Path(__file__).resolve().parent / "standins"
# Module of the upstream test package -> our stand-in file (the sdist does not ship these modules).
STANDIN_MODULES = {
    "exporters.test_export": "exporters_test_export.py",
    "generation.test_utils": "generation_test_utils.py",
    "utils.test_configuration_utils": "utils_test_configuration_utils.py",
    "causal_lm_tester": "causal_lm_tester.py",
}
# The sdist members we need: the top-level `tests/*.py` files (test_modeling_common imports only stand-ins beyond them).
_TOP_LEVEL_TEST_FILE = re.compile(r"^[^/]+/tests/[^/]+\.py$")
_PIP_TIMEOUT_S = 600


class UpstreamTestsUnavailable(RuntimeError):
    """The transformers sdist could not be fetched or imported; the message is a one-line reason."""


def cache_dir(version: str) -> Path:
    root = Path(os.environ.get("HF_ATTN_VARIANTS_CACHE", Path.home() / ".cache" / "hf-attn-variants"))
    return root / "transformers-sdist" / version


def _download_sdist(version: str, target: Path) -> Path:
    """The sdist archive in `target`, downloaded with pip unless already there."""
    name = f"transformers-{version}.tar.gz"
    archive = target / name
    if archive.is_file():
        return archive
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-input",
            "--disable-pip-version-check", f"transformers=={version}", "-d", tmp,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UpstreamTestsUnavailable(f"`pip download transformers=={version}` did not run: {error}") from error
        downloaded = Path(tmp) / name
        if result.returncode != 0 or not downloaded.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            raise UpstreamTestsUnavailable(f"`pip download transformers=={version}` sdist failed: {lines[-1]}")
        try:  # a truncated archive must not be cached
            with tarfile.open(downloaded) as tar:
                tar.getmembers()
        except (tarfile.TarError, EOFError) as error:
            raise UpstreamTestsUnavailable(f"the downloaded transformers sdist is unreadable: {error}") from error
        os.replace(downloaded, archive)
    return archive


def _extract_tests(archive: Path, tests_dir: Path) -> None:
    """Extract the archive's top-level `tests/*.py` into `tests_dir` (plus an empty `__init__.py`), atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=tests_dir.parent))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _TOP_LEVEL_TEST_FILE.match(m.name)]
            for member in members:
                (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        if not (tmp / "test_modeling_common.py").is_file():
            raise UpstreamTestsUnavailable(f"{archive.name} has no tests/test_modeling_common.py")
        # `test_configuration_common` runs `direct_transformers_import(<its folder>)`, which needs an `__init__.py`.
        (tmp / "__init__.py").write_text("")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, tests_dir)
        except OSError:  # another process extracted it first
            if not (tests_dir / "test_modeling_common.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upstream_tests_dir(version: str | None = None) -> Path:
    """The folder holding the extracted `tests/*.py` of transformers `version` (default: the installed one)."""
    if version is None:
        import transformers

        version = transformers.__version__
    target = cache_dir(version)
    tests_dir = target / "tests"
    if (tests_dir / "test_modeling_common.py").is_file():
        return tests_dir
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UpstreamTestsUnavailable(f"cannot create the cache folder {target}: {error}") from error
    _extract_tests(_download_sdist(version, target), tests_dir)
    return tests_dir


def _register_module(name: str, path: Path | None = None) -> types.ModuleType:
    """Import `path` as module `name` (or create an empty package `name`), attached to its parent package."""
    if name in sys.modules:
        return sys.modules[name]
    parent, _, child = name.rpartition(".")
    if path is None:
        module = types.ModuleType(name)
        module.__path__ = []
        sys.modules[name] = module
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def load_upstream_tests(version: str | None = None) -> types.ModuleType:
    """The package `hf_upstream_tests` with `test_modeling_common`, `test_configuration_common` and `causal_lm_tester`
    imported. Raises `UpstreamTestsUnavailable` (one-line reason) when the sdist cannot be had."""
    if PACKAGE in sys.modules and hasattr(sys.modules[PACKAGE], "causal_lm_tester"):
        return sys.modules[PACKAGE]
    tests_dir = upstream_tests_dir(version)
    spec = importlib.util.spec_from_file_location(
        PACKAGE, tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    try:
        for dotted, filename in STANDIN_MODULES.items():
            if dotted == "causal_lm_tester":
                continue  # imports test_modeling_common: loaded last
            parts = dotted.split(".")
            for depth in range(1, len(parts)):
                _register_module(".".join([PACKAGE, *parts[:depth]]))
            _register_module(f"{PACKAGE}.{dotted}", STANDINS / filename)
        with warnings.catch_warnings():
            # Upstream marks (flash_attn_test, torch_compile_test, ...) are registered in transformers' own conftest.
            warnings.filterwarnings("ignore", message=r"Unknown pytest\.mark\.")
            for name in ("test_modeling_common", "test_configuration_common"):
                importlib.import_module(f"{PACKAGE}.{name}")
        _register_module(f"{PACKAGE}.causal_lm_tester", STANDINS / STANDIN_MODULES["causal_lm_tester"])
    except ImportError as error:
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        raise UpstreamTestsUnavailable(f"transformers' test mixins do not import: {error}") from error
    return package
