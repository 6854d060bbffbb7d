"""Fetch the official dataset releases into a data directory, checking size and SHA-256.

Usage (needs internet)::

    python -m editlab.data.download --data-dir DIR [--only NAME ...] [--force]

Each file is streamed to a temporary file next to its destination, verified, and only then
renamed into place, so an interrupted or corrupted download never leaves a file behind.
The EasyEdit / KnowEdit subsets of the development share are not fetched here.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Release", "RELEASES", "DownloadError", "fetch", "verify_file", "main"]

log = logging.getLogger(__name__)

_ROME_DSETS = "https://rome.baulab.info/data/dsets"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Release:
    """One downloadable file: where it lives and, when known, its size and SHA-256."""

    name: str
    url: str
    dest: str  # relative to the data directory
    size: int | None = None
    sha256: str | None = None


RELEASES: tuple[Release, ...] = (
    Release("counterfact", f"{_ROME_DSETS}/counterfact.json", "counterfact/counterfact.json",
            45_108_470, "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"),
    Release("known_1000", f"{_ROME_DSETS}/known_1000.json", "known_1000/known_1000.json"),
    Release("zsre_mend_eval", f"{_ROME_DSETS}/zsre_mend_eval.json", "zsre/zsre_mend_eval.json"),
    Release("multi_counterfact", f"{_ROME_DSETS}/multi_counterfact.json",
            "counterfact/multi_counterfact.json"),
)

Opener = Callable[[str], IO[bytes]]


class DownloadError(RuntimeError):
    """A download failed or its content did not match the expected size or hash."""


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _check(what: str, size: int, sha256: str, release: Release) -> None:
    if release.size is not None and size != release.size:
        raise DownloadError(f"{what}: size {size} bytes, expected {release.size}")
    if release.sha256 is not None and sha256 != release.sha256.lower():
        raise DownloadError(f"{what}: sha256 {sha256}, expected {release.sha256}")


def verify_file(path: Path, release: Release) -> None:
    """Raise :class:`DownloadError` unless ``path`` has the release's size and hash (when known)."""
    size, sha256 = _digest(path)
    _check(str(path), size, sha256, release)


def fetch(release: Release, data_dir: str | Path, *, force: bool = False,
          opener: Opener = urllib.request.urlopen) -> Path:
    """Download ``release`` into ``data_dir`` (atomically) and return the destination path.

    An existing destination that passes verification is kept unless ``force`` is set.
    """
    dest = Path(data_dir).expanduser() / release.dest
    if dest.exists() and not force:
        try:
            verify_file(dest, release)
        except DownloadError as err:
            raise DownloadError(f"{err} (existing file; pass --force to download it again)") from err
        log.info("%s: %s already present and verified", release.name, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s", release.name, release.url)
    handle, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        sha = hashlib.sha256()
        size = 0
        with os.fdopen(handle, "wb") as out, opener(release.url) as response:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                sha.update(chunk)
                size += len(chunk)
        _check(f"{release.name} from {release.url}", size, sha.hexdigest(), release)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s: wrote %s (%d bytes)", release.name, dest, size)
    return dest


def main(argv: Sequence[str] | None = None, releases: Sequence[Release] = RELEASES) -> int:
    """Command-line entry point; returns the process exit status."""
    names = [r.name for r in releases]
    parser = argparse.ArgumentParser(prog="python -m editlab.data.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="directory to download into")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"fetch only these releases (of: {', '.join(names)})")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = 0
    for release in releases:
        if args.only and release.name not in args.only:
            continue
        try:
            fetch(release, args.data_dir, force=args.force)
        except (OSError, DownloadError) as err:
            log.error("%s: %s", release.name, err)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
