"""The digest of the C++/CUDA sources a build is made from.

setup.py records it in ``_build_info.json``; the loader compares it with the csrc/ of the
checkout the package sits in (an editable install or an in-place build), to tell a build
that is behind its sources: C++ edited, or a checkout updated, without a rebuild. Only the
standard library here: setup.py loads this file by itself, without the package.
"""

import hashlib
import os

# What the build compiles or includes; other files (an editor's backup) do not count.
SOURCE_SUFFIXES = (".cpp", ".cc", ".c", ".cu", ".h", ".hpp", ".cuh")


def csrc_digest(csrc):
    """sha256 (hex) of the sources below ``csrc``: each one's path relative to it and its
    bytes, in sorted path order; None if ``csrc`` is not a folder or a file cannot be read."""
    if not os.path.isdir(csrc):
        return None
    paths = []
    for folder, dirs, files in os.walk(csrc):
        dirs.sort()
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                paths.append(os.path.relpath(os.path.join(folder, name), csrc).replace(os.sep, "/"))
    digest = hashlib.sha256()
    try:
        for rel in sorted(paths):
            with open(os.path.join(csrc, rel), "rb") as f:
                data = f.read()
            digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
            digest.update(data)
    except OSError:
        return None
    return digest.hexdigest()
