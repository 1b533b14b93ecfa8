"""Which adapters a server can serve, where their folders are, and which are resident.

An adapter is *known* when it was pinned with ``--adapter NAME=PATH``, loaded at run time, or is a
subfolder of ``--adapter-dir``. At most ``max_loaded`` are *resident* (injected into the model);
the least recently used unpinned one with no sequence in flight is evicted to make room.
Everything here runs on the engine thread except ``resolve``/``read`` (pure file checks).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit import read_adapter
from lorakit.errors import AdapterLoadError, ServeError
from lorakit.io import CONFIG_NAME

from ..models import read_metadata

log = logging.getLogger("lorakit.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")


@dataclass
class Entry:
    """A known adapter: its folder, whether it is pinned, when it was last used (monotonic s)."""

    name: str
    path: Path
    pinned: bool = False
    last_used: float = 0.0
    created: int = 0


class Registry:
    """Known and resident adapters (see the module docstring)."""

    def __init__(self, adapter_dir: str | None, max_loaded: int, base_id: str, base_reference: str) -> None:
        self.root = Path(adapter_dir).resolve() if adapter_dir else None
        self.max_loaded = max_loaded
        self.base_id, self.base_reference = base_id, base_reference
        if self.root is not None and "/" not in base_id and (self.root / base_id / CONFIG_NAME).is_file():
            log.warning("adapter folder %s is named as the base model's id %r, which always means the base model: "
                        "it is not served (rename it to serve it)", self.root / base_id, base_id)
        self.entries: dict[str, Entry] = {}  # pinned and run-time loaded
        self.resident: set[str] = set()
        self.loading: set[str] = set()

    # --- names and folders ------------------------------------------------------------------

    def check_name(self, name: object, param: str) -> str:
        """An adapter name a client may use (``param`` names the field in the error): 1-128
        characters, letters, digits and ``._:@+/-``, starting with a letter or digit."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ServeError(400, f"{param} must be 1-128 letters, digits or ._:@+/- starting with a letter or "
                             f"digit, got {name!r}", param)
        if name == self.base_id:
            raise ServeError(400, f"{name!r} is the base model's id", param)
        return name

    def resolve(self, path: object, param: str = "lora_path") -> Path:
        """``path`` after symlinks, which must lie inside ``--adapter-dir`` (relative paths are
        taken from there) when the server has one."""
        if not isinstance(path, str) or not path:
            raise ServeError(400, f"{param} must be a non-empty string", param)
        try:
            p = Path(path)
            real = (self.root / p if self.root is not None else p).resolve()
            is_dir = real.is_dir()
        except (OSError, ValueError) as e:  # a NUL byte, a name too long, a surrogate
            raise ServeError(400, f"{param} {path[:200]!r} is not a usable path: {e}", param) from None
        if self.root is not None and real != self.root and self.root not in real.parents:
            raise ServeError(400, f"{param} {path!r} resolves outside the adapter folder {str(self.root)!r}", param)
        if not is_dir:
            raise ServeError(404 if self.root else 400, f"adapter folder {path!r} does not exist", param,
                             code="adapter_not_found")
        return real

    def read(self, path: Path, param: str = "lora_path"):
        """``(config, tensors)`` of an adapter folder, after the server's own checks: PEFT
        safetensors only, and, when lorakit.json names a base model, this server's."""
        try:
            config, tensors = read_adapter(path, allow_pickle=False)  # never unpickle what a request names
        except AdapterLoadError as e:
            raise ServeError(400, str(e), param, code="invalid_adapter") from None
        try:
            meta = read_metadata(path)
            base = meta.get("base_model")
        except Exception as e:  # noqa: BLE001 - a broken lorakit.json is the adapter's fault
            raise ServeError(400, f"{str(path)!r}: {e}", param, code="invalid_adapter") from None
        if base and base != self.base_reference:
            raise ServeError(400, f"adapter {str(path)!r} was trained on base model {base!r}, but this server "
                             f"serves {self.base_reference!r}", param, code="base_model_mismatch")
        if meta.get("quantize"):  # served as vLLM serves QLoRA adapters: on the full-precision base
            log.warning("adapter %s was trained on a %s-quantised base; served on this full-precision base, so "
                        "its outputs can differ slightly from lorakit eval / generate, which rebuild the "
                        "quantised base", path, meta["quantize"])
        return config, tensors

    # --- the set of servable adapters ---------------------------------------------------------

    def known(self, name: str) -> Entry | None:
        """The entry of a servable adapter (pinned, run-time loaded, or an ``--adapter-dir``
        subfolder), or None."""
        if name in self.entries:
            return None if self._gone(self.entries[name]) else self.entries[name]
        if self.root is None:
            return None
        if not NAME.fullmatch(name) or "/" in name or name in (".", "..", self.base_id):  # the base id: the base
            return None
        folder = (self.root / name).resolve()  # a symlinked subfolder must point inside the folder too
        if self.root not in folder.parents or not (folder / CONFIG_NAME).is_file():
            return None
        return Entry(name, folder, created=int(folder.stat().st_mtime))

    def listing(self) -> list[Entry]:
        """Every servable adapter, by name."""
        out = {n: e for n, e in self.entries.items() if not self._gone(e)}
        if self.root is not None and self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if folder.name not in out and (e := self.known(folder.name)) is not None:
                    out[folder.name] = e
        return [out[k] for k in sorted(out)]

    def _gone(self, e: Entry) -> bool:
        """Whether ``e`` is no longer servable: not resident, and its folder's config deleted since it loaded."""
        return e.name not in self.resident and not (Path(e.path) / CONFIG_NAME).is_file()

    def add(self, name: str, path: Path, pinned: bool = False) -> Entry:
        """Remember a servable adapter (a resident one stays remembered after eviction)."""
        old = self.entries.get(name)
        e = self.entries[name] = Entry(name, path, pinned or bool(old and old.pinned), time.monotonic(),
                                       old.created if old else int(time.time()))
        return e

    def touch(self, name: str) -> None:
        """Mark a known adapter as just used (for least-recently-used eviction)."""
        self.entries[name].last_used = time.monotonic()

    def victim(self, busy: set[str]) -> str | None:
        """The least recently used resident adapter that may be evicted, or None."""
        free = [n for n in self.resident if n not in busy and not self.entries[n].pinned]
        return min(free, key=lambda n: self.entries[n].last_used, default=None)

    def room(self) -> int:
        return self.max_loaded - len(self.resident) - len(self.loading)
