"""Where weights come from, and loading them so that nothing is silently left random.

Resolution order for a model (see :func:`locate`):

1. ``--weights PATH``: a file, or a folder in the model's published layout;
2. ``$CALBENCH_WEIGHTS/<model>/`` when that folder exists (copied onto an offline cluster);
3. the model's published source (Hugging Face Hub or a URL) through the library's own
   cache (``HF_HOME`` / ``TORCH_HOME``); with ``HF_HUB_OFFLINE=1`` only that cache is read.

When none works the user gets one line naming the model, where calbench looked and how to
get the weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from calbench.errors import CalbenchError

if TYPE_CHECKING:  # torch is imported where weights are read, not to list or locate models
    from torch import Tensor, nn

WEIGHTS_ENV = "CALBENCH_WEIGHTS"


def offline() -> bool:
    """The Hugging Face convention: HF_HUB_OFFLINE=1 means read caches, never the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape and bytes: the weights' identity."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(backend: str, name: str, config_id: str, module: nn.Module) -> str:
    """A loaded model's identity for cache keys: backend, registry name, architecture config and weights."""
    return f"{backend}:{name}:cfg-{config_id}:w-{state_dict_digest(module)}"


#: whether TorchScript archives may be loaded; set only by :func:`trusting_code` (``--trust-weights``)
_TRUST_CODE: ContextVar[bool] = ContextVar("calbench_trust_weights", default=False)


@contextmanager
def trusting_code(allow: bool = True) -> Iterator[None]:
    """Within this block, let :func:`load_state_dict_file` load TorchScript archives (running their code).

    One scoped setting instead of a parameter through every model builder and backend:
    they all read weights through :func:`load_state_dict_file`.
    """
    token = _TRUST_CODE.set(allow)
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with the ``constants.pkl`` or ``code/`` that ``torch.jit.load`` executes."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.split("/", 1)[-1] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name == "constants.pkl" or name.startswith("code/") for name in names)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read weights from safetensors or a torch checkpoint: tensors only (``weights_only=True``).

    A TorchScript archive runs code embedded in it when loaded, so it is refused unless the
    caller trusts it (:func:`trusting_code`, the CLI's ``--trust-weights``).
    """
    import torch

    if not path.is_file():
        raise CalbenchError(f"weights file {path} does not exist; pass --weights with an existing file")
    if path.suffix != ".safetensors" and is_torchscript(path):
        if not _TRUST_CODE.get():
            raise CalbenchError(
                f"weights file {path} is a TorchScript archive, which runs code embedded in it when loaded "
                "(OpenAI-format CLIP .pt files such as PLIP's are); pass --trust-weights if you trust its source, "
                "or convert it to a state dict"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise CalbenchError(f"cannot read TorchScript weights file {path}: {_first_line(exc)}") from None
        return dict(state)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file, or a pickle holding more than tensors
        raise CalbenchError(f"cannot read weights file {path}: {_first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CalbenchError(f"weights file {path} holds no state dict; save model.state_dict() instead")
    return state


def first_file(folder: Path, names: tuple[str, ...]) -> Optional[Path]:
    """The first of ``names`` present in ``folder`` (e.g. safetensors before a pickle)."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_strict(module: nn.Module, state: dict[str, Tensor], name: str, source: Union[str, Path]) -> None:
    """Load ``state`` with no missing or unexpected keys, or fail with one line.

    Checkpoints saved by older ``transformers`` also hold buffers that newer versions
    compute themselves (``position_ids``, Swin's ``relative_position_index``); those
    are dropped, because they are not learned.
    """
    if any(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    computed = {k for k, _ in module.named_buffers() if k not in own}
    legacy = {"position_ids", "token_type_ids", "relative_position_index"}
    state = {
        k: v for k, v in state.items() if k not in computed and not (k not in own and k.rsplit(".", 1)[-1] in legacy)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CalbenchError(
            f"weights {source} do not fit model {name!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of the wrong shape (e.g. {wrong[:3]})"
        )
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub repository: all ``required`` files, and the first of ``one_of`` it has
    (weights, preferred format first); ``optional`` files come along when present."""

    repo_id: str
    one_of: tuple[str, ...]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"hf-hub:{self.repo_id}"

    def hint(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    def resolve(self, download: bool) -> Optional[Path]:
        """The local snapshot folder, from the HF cache (and the network if ``download``); None if absent."""
        from huggingface_hub import hf_hub_download, list_repo_files

        def get(file: str) -> Optional[Path]:
            try:
                return Path(hf_hub_download(self.repo_id, file, local_files_only=not download))
            except Exception:
                if download and file in self.required:
                    raise
                return None

        if download:  # one weights format only (the preferred one the repository has)
            published = set(list_repo_files(self.repo_id))
            one_of = [f for f in self.one_of if f in published][:1]
            optional = [f for f in self.optional if f in published]
        else:
            one_of, optional = list(self.one_of), list(self.optional)
        required = [get(f) for f in self.required]
        weights = next((path for path in map(get, one_of) if path is not None), None)
        if weights is None or not all(required):
            if download:
                raise CalbenchError(f"{self.describe()} has none of {', '.join(self.one_of)}")
            return None
        for file in optional:
            get(file)
        return weights.parent


@dataclass(frozen=True)
class UrlSource:
    """A zip published at a URL (``pointer``: a text file that holds the zip's URL, as MedCLIP publishes it)."""

    url: str
    folder: str
    expect: str
    pointer: bool = False

    def describe(self) -> str:
        return self.url

    def hint(self) -> str:
        return self.url

    def target(self) -> Path:
        import torch

        return Path(torch.hub.get_dir()) / "calbench" / self.folder

    def resolve(self, download: bool) -> Optional[Path]:
        target = self.target()
        if (target / self.expect).is_file():
            return target
        if not download:
            return None
        url = self.url
        if self.pointer:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                url = response.read().decode().strip()
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            archive = Path(tmp) / "weights.zip"
            from torch.hub import download_url_to_file

            download_url_to_file(url, str(archive), progress=True)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "x")
            found = next((Path(tmp) / "x").rglob(self.expect), None)
            if found is None:
                raise CalbenchError(
                    f"the archive from {url} has no {self.expect}; download it by hand into ${WEIGHTS_ENV}/{self.folder}/"
                )
            if target.exists():
                shutil.rmtree(target)
            os.replace(found.parent, target)  # atomic: a half-extracted folder is never seen
        return target


Source = Union[HubSource, UrlSource]


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` answers at all: without network, fail in seconds, not after retries."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def locate(
    name: str, source: Optional[Source], weights: Optional[Union[str, Path]], fetch_command: str
) -> Optional[Path]:
    """The file or folder to load ``name`` from, following the order in the module docstring."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise CalbenchError(
                f"--weights {path} does not exist; pass a weights file or a folder in {name}'s published layout"
            )
        return path
    home = os.environ.get(WEIGHTS_ENV)
    if home and (Path(home) / name).is_dir():
        return Path(home) / name
    if source is None:
        return None
    found = source.resolve(download=False)
    if found is not None:
        return found
    looked = (
        f"${WEIGHTS_ENV}/{name}"
        + ("" if home else f" ({WEIGHTS_ENV} unset)")
        + f" and the cache of {source.describe()}"
    )
    if not offline() and reachable(source.hint()):
        try:
            found = source.resolve(download=True)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise CalbenchError(
                f"no weights for model {name!r}: looked in {looked}; downloading failed ({reason}); "
                f"run `{fetch_command}` where there is internet, or download {source.hint()} and pass --weights"
            ) from None
        if found is not None:
            return found
    raise CalbenchError(
        f"no weights for model {name!r}: looked in {looked} (no network{'' if not offline() else ': HF_HUB_OFFLINE is set'}); "
        f"run `{fetch_command}` with internet, or copy the files from {source.hint()} into ${WEIGHTS_ENV}/{name}/ or pass --weights"
    )
