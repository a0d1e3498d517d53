"""Where tests/bootstrap builds the real Klipper stack, and how the tests find it.

Standard library only, and Python 3.9: tests/bootstrap runs this file with whatever
``$PYTHON`` it was given (``python3 tests/support/klipper_build.py digest DIR``), and
the tests import it. One definition of the digest serves both, so the directory the
bootstrap builds is the directory the tests look in.

The sources are third-party GPLv3 code used only as test fixtures: Klipper (the
Klippy host and the Linux-process MCU) and Moonraker, at pinned commits. They come
from ``../shared/fixtures`` beside the checkout (read-only: never built in place),
or, in a clone without it, from the same commits fetched by the bootstrap into
``<cache>/klipper-upstream``. Either way the bootstrap copies them to
``<cache>/klipper-<digest>`` and builds there: a klippy venv, a Moonraker venv,
``out/klipper.elf`` (``CONFIG_MACH_LINUX=y``) and Klippy's ``c_helper.so``. The stamp
``.built`` is written last, so a build that was cut short is never used.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

# The upstream commits the fixtures hold (their README.fixture files); the bootstrap
# fetches these where the fixtures are absent.
KLIPPER_URL = "https://github.com/Klipper3d/klipper"
KLIPPER_COMMIT = "84104bbbd7625d28b4eaaad83f4562972460ecd9"
MOONRAKER_URL = "https://github.com/Arksine/moonraker"
MOONRAKER_COMMIT = "d5ee17128bb88434aacdab90c2e9e990e2b64e4a"

TREES = ("klipper", "moonraker")
# What git, Python and a build leave beside the sources; none of it changes the stack.
_IGNORED_DIRS = frozenset({".git", "__pycache__", "out"})
_IGNORED_SUFFIXES = (".pyc", ".so", ".o")
_IGNORED_NAMES = frozenset({".config", ".config.old"})

CHECKOUT = Path(__file__).resolve().parents[2]
BUILT_STAMP = ".built"
UNAVAILABLE_NOTE = "klipper-unavailable"


def cache_dir() -> Path:
    """Return the test cache, as :func:`tests.support.cache.cache_dir` does.

    tests/bootstrap runs this file as a script, outside the package: it cannot import that.
    """
    return Path(os.environ.get("RECONNECTD_TEST_CACHE") or Path.home() / ".cache/reconnectd-tests")


def fixture_digest(sources: Path) -> str:
    """Given a directory holding ``klipper/`` and ``moonraker/``, return 16 hex digits
    that change whenever a file's path, content or executable bit changes there."""
    digest = hashlib.sha256()
    for tree in TREES:
        top = sources / tree
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIRS]
            files.extend(
                Path(dirpath, f)
                for f in filenames
                if not f.endswith(_IGNORED_SUFFIXES) and f not in _IGNORED_NAMES
            )
        for path in sorted(files, key=lambda p: p.relative_to(sources).as_posix()):
            info = path.lstat()
            digest.update(path.relative_to(sources).as_posix().encode() + b"\0")
            if stat.S_ISLNK(info.st_mode):
                data = b"link:" + os.readlink(path).encode()
            else:
                # scripts/check-gcc.sh must stay executable for make: the bit matters.
                data = b"x" if info.st_mode & stat.S_IXUSR else b"-"
                data += path.read_bytes()
            digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def find_sources(checkout: Path = CHECKOUT) -> Path | None:
    """Given a checkout, return the directory holding both source trees: the shared
    fixtures beside it, else the bootstrap's clone; None when neither is complete."""
    for candidate in (checkout.parent / "shared/fixtures", cache_dir() / "klipper-upstream"):
        if all((candidate / tree).is_dir() for tree in TREES):
            return candidate.resolve()
    return None


@dataclass(frozen=True)
class KlipperBuild:
    """A finished build of the stack: both trees, their venvs and the Linux MCU."""

    root: Path

    @property
    def klipper_dir(self) -> Path:
        return self.root / "klipper"

    @property
    def moonraker_dir(self) -> Path:
        return self.root / "moonraker"

    @property
    def klippy_python(self) -> Path:
        return self.root / "kenv/bin/python"

    @property
    def moonraker_python(self) -> Path:
        return self.root / "menv/bin/python"

    @property
    def mcu_elf(self) -> Path:
        return self.root / "klipper/out/klipper.elf"

    def problem(self) -> str | None:
        """Given a build directory, return what is missing from it, or None if complete."""
        if not (self.root / BUILT_STAMP).is_file():
            return f"{self.root} is not a finished build (no {BUILT_STAMP}): run tests/bootstrap"
        for path in (self.klippy_python, self.moonraker_python, self.mcu_elf):
            if not os.access(path, os.X_OK):
                return (
                    f"{path} is missing from the build: remove {self.root} and run tests/bootstrap"
                )
        return None


def find_build(checkout: Path = CHECKOUT) -> KlipperBuild | str:
    """Given a checkout, return the finished build of the stack, or why there is none.

    ``$KLIPPER_STACK`` (what tests/bootstrap prints, passed on by tests/run) names it;
    without it, the build is looked up by the digest of the sources, as the bootstrap
    names it.
    """
    named = os.environ.get("KLIPPER_STACK")
    if named:
        build = KlipperBuild(Path(named))
        return build.problem() or build
    sources = find_sources(checkout)
    if sources is None:
        note = cache_dir() / UNAVAILABLE_NOTE
        if note.is_file():
            return note.read_text().strip()
        return (
            f"no Klipper/Moonraker sources: neither {checkout.parent / 'shared/fixtures'} "
            f"nor {cache_dir() / 'klipper-upstream'} (tests/bootstrap fetches Klipper "
            f"{KLIPPER_COMMIT[:9]} and Moonraker {MOONRAKER_COMMIT[:7]} when it can)"
        )
    build = KlipperBuild(cache_dir() / f"klipper-{fixture_digest(sources)}")
    return build.problem() or build


def main(argv: list[str]) -> int:
    """Given ``[prog, "digest", DIR]``, print the digest of DIR's trees; return the exit code."""
    if len(argv) == 3 and argv[1] == "digest":
        print(fixture_digest(Path(argv[2])))
        return 0
    if len(argv) == 2 and argv[1] == "pins":
        # For the bootstrap: one "tree url commit" line per source it may fetch.
        print(f"klipper {KLIPPER_URL} {KLIPPER_COMMIT}")
        print(f"moonraker {MOONRAKER_URL} {MOONRAKER_COMMIT}")
        return 0
    print(f"usage: {argv[0]} digest DIR | pins", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
