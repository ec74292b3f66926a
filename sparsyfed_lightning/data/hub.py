"""Loading from the Hugging Face Hub through the normal `datasets` cache, failing fast when offline.

Left alone, `datasets.load_dataset` on a machine without network retries for about 25 s before it
gives up (measured here), and its error does not say how to proceed. So, before loading:

* when offline mode is requested (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` set now, or at import),
  or the Hub endpoint does not accept a TCP connection within `PROBE_TIMEOUT_S`, the load runs in
  offline mode: a dataset already in the `datasets` cache still loads, anything else fails at once;
* any failure becomes one `DatasetUnavailableError` line naming the dataset, the Hub id and how to
  give the data locally (`--data.path`).

The probe is skipped when an HTTP(S) proxy is configured (a direct connection says nothing then).
Offline mode is switched on by patching the two module-level flags `datasets` and
`huggingface_hub` read (`datasets.config.HF_HUB_OFFLINE`, `huggingface_hub.constants.HF_HUB_OFFLINE`)
for the duration of the call, because both read the environment only once, at import.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class DatasetUnavailableError(ConnectionError):
    """A Hub dataset could neither be downloaded nor found in the local `datasets` cache."""


def offline_requested() -> bool:
    """True when the environment (now or at import) asks `datasets`/`huggingface_hub` to stay offline."""
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return True
    return bool(datasets.config.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within `timeout` s (True behind a proxy)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((endpoint.hostname, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    # The name lookup ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@contextlib.contextmanager
def hub_offline_mode(offline: bool) -> Iterator[None]:
    """Temporarily switch `datasets` and `huggingface_hub` to offline (cache-only) mode."""
    if not offline:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(
    dataset: str, repo_id: str, *, revision: str | None = None, data_dir: str | None = None, local_formats: str = ""
):
    """`datasets.load_dataset(repo_id)` (all splits) or one `DatasetUnavailableError` line.

    `local_formats` names what else `--data.path` accepts for this dataset (said in the error).
    """
    import datasets

    offline = offline_requested() or not hub_reachable()
    try:
        with hub_offline_mode(offline):
            return datasets.load_dataset(repo_id, revision=revision, data_dir=data_dir)
    except Exception as err:  # connection, missing-in-cache, missing-on-Hub, ...: all mean "not available"
        reason = (" ".join(str(err).split()) or type(err).__name__)[:300]
        where = repo_id + (f" (revision {revision}, {data_dir})" if revision or data_dir else "")
        state = "the Hub is not reachable (offline)" if offline else "loading failed"
        raise DatasetUnavailableError(
            f"dataset {dataset!r}: cannot load {where} from the Hugging Face Hub: {state}, and it is not in "
            f"the datasets cache ({type(err).__name__}: {reason}); download it on a machine with network "
            f"and pass the local copy with --data.path (FederatedDataModule(path=...))"
            + (f"; --data.path also accepts {local_formats}" if local_formats else "")
        ) from err
