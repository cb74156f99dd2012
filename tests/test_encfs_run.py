"""skr encfs as a process: /healthz, /readyz and the ready file follow the mounter; stop tears down; a
failed mount writes 0 and raises. The mounter is a stand-in: the real one is tested end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from skr.encfs.args import parse_encfs_json
from skr.encfs.errors import LuksWrongKey
from skr.encfs.run import serve_encfs

ARGS = parse_encfs_json('{"azure_filesystems": [{"mount_point": "/m/a", "azure_url": "https://x/c/b"}]}')


class FakeMounter:
    def __init__(self, *, fail: Exception | None = None) -> None:
        self.args = ARGS
        self.ready = False
        self.state = {"/m/a": "pending"}
        self.release = asyncio.Event()
        self.fail = fail
        self.torn_down = 0

    async def mount_all(self) -> None:
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        self.ready = True
        self.state["/m/a"] = "published"

    async def teardown(self) -> None:
        self.ready = False
        self.torn_down += 1


async def status(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.json()


async def test_readyz_and_the_ready_file_turn_true_once_published_then_stop_tears_down(
    tmp_path: Path,
) -> None:
    mounter, stop, ready_file = FakeMounter(), asyncio.Event(), tmp_path / "ready"
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_encfs(mounter, stop, port=0, ready_file=ready_file, started=started)  # type: ignore[arg-type]
    )
    port = await started
    assert await status(port, "/healthz") == (200, {"status": "ok"})
    assert await status(port, "/readyz") == (503, {"ready": False, "filesystems": {"/m/a": "pending"}})
    assert not ready_file.exists()
    mounter.release.set()
    for _ in range(100):
        if ready_file.exists():
            break
        await asyncio.sleep(0.01)
    assert ready_file.read_text() == "1\n"
    assert await status(port, "/readyz") == (200, {"ready": True, "filesystems": {"/m/a": "published"}})
    stop.set()
    await asyncio.wait_for(task, 5)
    assert mounter.torn_down == 1 and not ready_file.exists()


async def test_a_failed_mount_writes_0_and_raises(tmp_path: Path) -> None:
    mounter = FakeMounter(fail=LuksWrongKey("filesystem 0 (/m/a): LUKS2 unlock: the key does not open it"))
    mounter.release.set()
    ready_file = tmp_path / "ready"
    with pytest.raises(LuksWrongKey):
        await serve_encfs(mounter, asyncio.Event(), ready_file=ready_file)  # type: ignore[arg-type]
    assert mounter.torn_down == 1
    assert ready_file.read_text() == "0\n"  # stays, as the Go sidecar's result file


def test_azure_info_sets_the_release_identity_and_certcache_below_flags_and_env() -> None:
    from skr.config import load_settings
    from skr.encfs.run import base_settings

    doc = (
        '{"azure_info": {"identity": {"client_id": "cid-1"}, "certcache": {"endpoint_type": "LocalTHIM",'
        ' "endpoint": "169.254.169.254/metadata/THIM/amd/certification", "unknown": 1}},'
        ' "azure_filesystems": [{"mount_point": "/m/a", "azure_url": "https://x/c/b"}]}'
    )
    args = parse_encfs_json(doc)
    settings = load_settings(None, {}, base=base_settings(args, {}))
    assert settings.identity_client_id == "cid-1"
    assert settings.certcache.endpoint_type == "LocalTHIM"
    assert settings.certcache.endpoint == "169.254.169.254/metadata/THIM/amd/certification"
    assert base_settings(ARGS, {}).identity_client_id is None


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["encfs"], {}, "needs EncfsSideCarArgs (env) or --config FILE"),
        (["encfs"], {"EncfsSideCarArgs": "!!"}, "EncfsSideCarArgs is not standard base64"),
        (["encfs", "--cache-blocks", "0"], {"EncfsSideCarArgs": "e30="}, "no azure_filesystems"),
        (["encfs", "upload", "/etc/hostname", "--url", "http://a.blob.core.windows.net/c/b"], {}, "https"),
        (["encfs", "inspect", "/nonexistent"], {}, "is not a file"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from skr.cli import main

    monkeypatch.delenv("EncfsSideCarArgs", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
