"""Installation-wide settings: where caches and the pseudonymisation secret live.

All paths the pipeline writes outside a job's own output folder come from one
:class:`Settings` object, built from the environment by :meth:`Settings.from_env`.
Nothing here is module-level mutable state: pass a ``Settings`` where behaviour
must differ (tests build their own with a temporary ``home``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "ISNET_CXR_HOME"
ENV_SECRET = "ISNET_CXR_SECRET"


@dataclass(frozen=True)
class Settings:
    """Typed settings for one installation.

    Attributes:
        home: root folder for caches and the secret (``$ISNET_CXR_HOME``, default
            ``~/.cache/isnet-cxr``).
        secret_override: a secret given through ``$ISNET_CXR_SECRET`` (hex or text);
            when set, the secret file is not read or created.
    """

    home: Path
    secret_override: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get(ENV_HOME, Path.home() / ".cache" / "isnet-cxr"))
        return cls(home=home.expanduser(), secret_override=os.environ.get(ENV_SECRET) or None)

    @property
    def cache_dir(self) -> Path:
        """Folder for fetched data (e.g. the CT volume used by the realistic synthetic mode)."""
        return self.home / "cache"

    @property
    def secret_path(self) -> Path:
        return self.home / "pseudonym.key"

    def pseudonym_secret(self) -> bytes:
        """The per-installation key for pseudonymous ids, created (mode 0600) on first use."""
        if self.secret_override:
            return self.secret_override.encode()
        path = self.secret_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # atomic: the first writer wins, others read its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_bytes()
