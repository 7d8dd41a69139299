"""`method.path` as a Hub id (`org/name`, optionally `@revision`): the checkpoint repository's snapshot in the local
Hugging Face cache, found exactly as `model=hf` finds a model (the cache first; a download only when this machine
may reach the Hub; offline, one line saying the snapshot is missing).

A snapshot holding a config.json is a checkpoint directory; one without holds GGUF files, and the one it holds is
the checkpoint (several: name the file, `org/name@revision/FILE.gguf`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from checkpoints.base import CheckpointError

# org/name, then optionally @revision, then optionally /FILE inside the repository (a GGUF repository's file)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?:/(?P<file>[^/@]+\.gguf))?$")


def looks_local(text: str) -> bool:
    """A path on this machine (absolute, relative to here, in the home directory, or existing), not a Hub id."""
    return os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(os.path.expanduser(text))


def resolve_checkpoint_path(text: str) -> Path:
    """A local file or directory as given, or a Hub id's checkpoint in its cached snapshot (CheckpointError, one line,
    when it is neither)."""
    if looks_local(text):
        return Path(text).expanduser()
    match = HUB_ID.match(text)
    if match is None:
        return Path(text).expanduser()  # neither: reader_for says it does not exist
    snapshot = _snapshot(match["repo"], match["revision"], text)
    if match["file"]:
        path = snapshot / match["file"]
        if not path.is_file():
            raise CheckpointError(f"method.path={text!r}: the snapshot {snapshot} holds no {match['file']}")
        return path
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(p.name for p in snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return snapshot / ggufs[0]
    what = "no config.json and no GGUF file" if not ggufs else f"{len(ggufs)} GGUF files ({', '.join(ggufs[:4])}...)"
    raise CheckpointError(f"method.path={text!r}: its snapshot holds {what}; allowed values: a checkpoint repository, "
                          f"or one GGUF file of it as {match['repo']}/FILE.gguf")


def _snapshot(repo: str, revision: str | None, text: str) -> Path:
    """The cached snapshot directory of `repo` at `revision` (default main); downloaded only when not offline."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and kin: not in the cache (or only partly)
        pass
    where = f"{repo}@{revision}" if revision else repo
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"method.path={text!r} is not a local path, and the Hub snapshot of {where} is not in "
                              f"the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                              "it cannot be downloaded")
    try:
        return Path(snapshot_download(repo, revision=revision))
    except Exception as err:  # unreachable Hub, unknown or gated repository, bad revision: each its own class
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"method.path={text!r} is not a local path, and the Hub snapshot of {where} is not in "
                              f"the local Hugging Face cache and downloading it failed ({type(err).__name__}: "
                              f"{reason}); allowed values: a local checkpoint, or a Hub id cached on this machine") \
            from None
