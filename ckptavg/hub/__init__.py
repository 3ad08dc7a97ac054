"""Hub revisions → Trajectory, and Hub checkpoints → files in the standard Hugging Face cache.

A Hub trajectory is spelled with huggingface_hub's own URI grammar: ``hf://org/name`` is every
branch of the model repo whose name carries a step (Pythia: ``step0`` … ``step143000``), and
``hf://org/name@step1000`` is that one branch. Steps are read from branch names with a regex
(``DEFAULT_STEP_PATTERN``; OLMo's ``step1000-tokens4B`` needs ``^step(\\d+)-tokens\\d+B?$``);
``main`` and other branches without a step are ignored.

Discovery reads only metadata: the repo's refs, then the file tree of each branch's commit (names,
sizes, LFS sha256), plus each sharded revision's small index file. Checkpoints come back with
``files=()`` and ``tensors=None`` and a :class:`HubSource` saying what to fetch. Weight files
that two step branches share byte for byte (same LFS sha256) are recorded in ``same_as``: the Hub
holds the same checkpoint under two names (76 step branches of pythia-2.8b are the final model),
and :func:`materialise` refuses to average them unless told to.

:func:`materialise` runs inside :func:`ckptavg.average` (through :mod:`ckptavg.sources`), before any tensor is read: it checks
safetensors headers with range requests (names, shapes, dtypes against each other and against the
index) before the big downloads, then downloads with ``hf_hub_download`` — weights of each selected
revision, config and tokenizer files of the newest only, several files at once, pinned to the
commits discovery saw, into the standard cache where other HF tools find them. A file already in
the cache is never downloaded again. Every file is checked against the Hub's sha256 (LFS) or git
blob id after download, because ``hf_hub_download`` checks sizes only; a corrupt copy is removed
from the cache and fetched again. ``.bin`` files have no header to read remotely: the engine reads
their names and shapes after download, before averaging.

With ``HF_HUB_OFFLINE=1`` nothing touches the network: discovery reads the cache's
``refs/<branch>`` files and ``snapshots/<commit>/`` folders, so the trajectory is what the cache
holds. :func:`evict` deletes the weight files of consumed revisions from the cache (refs, configs and
blobs still used by another revision stay).

Modules: :mod:`.discover` (refs, trees → Trajectory), :mod:`.transport` (the one retry loop and
error messages), :mod:`.fetch` (verified downloads, :func:`materialise`), :mod:`.cache` (offline
listings, verification stamps, :func:`evict`), :mod:`.compat` (what differs between huggingface_hub
0.20 and 2.x). huggingface_hub is imported inside the functions, so importing this package costs nothing.
"""

from __future__ import annotations

from ..trajectory import HubFile, HubSource
from .cache import evict
from .discover import DEFAULT_STEP_PATTERN, discover
from .fetch import materialise
from .transport import HubWarning

__all__ = ["DEFAULT_STEP_PATTERN", "HubFile", "HubSource", "HubWarning", "discover", "evict", "materialise"]
