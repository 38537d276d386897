"""Loading pretrained weights without hanging on a machine that has no internet.

torchvision weights come from ``download.pytorch.org`` into ``$TORCH_HOME/hub/checkpoints``; timm weights
from the Hugging Face hub into ``$HF_HOME``. A cached file is used as it is. Otherwise, unless
``DYNLOSS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids it, the host is probed with a short TCP connect and
the download runs under a socket timeout; any failure becomes one ``PretrainedWeightsError`` saying where to
put the file (timm's own retry loop would otherwise spend about a minute on a machine with no DNS).

    DYNLOSS_OFFLINE=1 python -c "from dynloss.models import build_model; build_model('resnet18', 10, pretrained=True)"
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

CONNECT_TIMEOUT_S = 5.0
DOWNLOAD_TIMEOUT_S = 60.0


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had here."""


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("DYNLOSS_OFFLINE", "HF_HUB_OFFLINE"))


def _proxied() -> bool:
    return any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"))


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Can a TCP connection to the URL's host be opened quickly? (True when a proxy is set: it decides.)"""
    if _proxied():
        return True
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def torchvision_state_dict(name: str, weights) -> dict:
    """State dict of a torchvision ``WeightsEnum`` member, from the cache or a bounded download."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.exists():
        why = None
        if offline():
            why = "DYNLOSS_OFFLINE/HF_HUB_OFFLINE is set"
        elif not reachable(weights.url):
            why = f"{urlparse(weights.url).hostname} is not reachable"
        if why:
            raise PretrainedWeightsError(
                f"pretrained weights for {name} are not cached and cannot be downloaded ({why}). "
                f"On a machine with internet access fetch {weights.url} and copy it to {cached} "
                f"(or set TORCH_HOME), or use pretrained=False.")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # network errors, truncated or corrupt files: one clear message
        raise PretrainedWeightsError(
            f"could not load pretrained weights for {name} from {cached if cached.exists() else weights.url}: "
            f"{type(e).__name__}: {e}. Put a good copy at {cached} or use pretrained=False.") from e


def timm_pretrained_overlay(name: str) -> dict:
    """``pretrained_cfg_overlay`` for ``timm.create_model`` that points at a local file when one is cached."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise PretrainedWeightsError(f"timm has no pretrained weights for {name}; use pretrained=False")
    hub_id = cfg.hf_hub_id
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + ["model.safetensors",
                                                                                     "pytorch_model.bin"]:
            path = try_to_load_from_cache(hub_id, filename)
            if isinstance(path, str) and os.path.exists(path):
                return {"file": path}
    where = f"https://huggingface.co/{hub_id}" if hub_id else (cfg.url or "")
    why = None
    if offline():
        why = "DYNLOSS_OFFLINE/HF_HUB_OFFLINE is set"
    elif where and not reachable(where):
        why = f"{urlparse(where).hostname} is not reachable"
    if why:
        raise PretrainedWeightsError(
            f"pretrained weights for {name} are not cached and cannot be downloaded ({why}). On a machine "
            f"with internet access run `huggingface-cli download {hub_id}` (cache under HF_HOME) and copy "
            f"the cache here, or use pretrained=False.")
    return {}


@contextmanager
def bounded_download(name: str):
    """Run a download under the socket timeout; turn any failure into PretrainedWeightsError."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            yield
    except PretrainedWeightsError:
        raise
    except Exception as e:
        raise PretrainedWeightsError(
            f"could not load pretrained weights for {name}: {type(e).__name__}: {e}. "
            f"Cache them on a machine with internet access, or use pretrained=False.") from e
