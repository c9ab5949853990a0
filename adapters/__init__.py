"""Adapters: the kit's monitor, alerts, report and checks for runs made by TRL, OpenRLHF and veRL.

- `adapters.sources`: read their runs live (TensorBoard dirs, veRL's file logger, a mapped
  JSONL/CSV) as kit step records; `detect(path)`.
- `adapters.aliases`: their metric names -> the kit's catalogue, per framework, sources cited.
- `adapters.logger.RunLogger`: write a complete kit run dir from their training loop.
- `adapters.hf.KitCallback`: the same as a transformers `TrainerCallback` (imports transformers).

Imports only the stdlib, msgpack and `protocol` at module level (tensorboard when a TensorBoard
dir is read); never `trainerd` or `tui`.
"""

from .aliases import TABLES, map_metrics
from .logger import RunLogger
from .sources import LOOKED_FOR, Source, SourceError, detect, not_recognised
