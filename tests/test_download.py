"""`minimind data download` against a loopback server that speaks the Hugging Face Hub's resolve protocol and
ModelScope's file URLs (no network, no mocks): resume, skip, size and sha256 checks. Run: .venv/bin/pytest
tests/test_download.py"""

import argparse
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from minimind import MiniMindError
from minimind.commands.data import add_download_parser
from minimind.data.download import (
    HF_REPO,
    MS_REPO,
    REGISTRY,
    download,
    format_list,
    http_download,
    modelscope_url,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """Files served at /datasets/{repo}/resolve/{revision}/{file} (HEAD and GET, with ETag = sha256 as for LFS
    files, X-Repo-Commit, Content-Length and Range) and at ModelScope's /api/v1/datasets/{repo}/repo?FilePath=."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.etags = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        self.cut = set()  # files whose next GET sends half the bytes, then drops the connection
        self.log = []  # (method, file, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _file(self):
                url = urlparse(self.path)
                hf_prefix = f"/datasets/{HF_REPO}/resolve/"
                if url.path.startswith(hf_prefix):
                    _, name = unquote(url.path[len(hf_prefix):]).split("/", 1)
                    return name
                if url.path == f"/api/v1/datasets/{MS_REPO}/repo":
                    return parse_qs(url.query).get("FilePath", [None])[0]
                return None

            def _serve(self, body: bool):
                name = self._file()
                hub.log.append((self.command, name, self.headers.get("Range")))
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{hub.etags[name]}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                if name in hub.cut:
                    hub.cut.discard(name)
                    self.wfile.write(data[start:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # short of Content-Length: the client sees a dropped transfer
                    return
                self.wfile.write(data[start:])

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name):
        return [r for m, n, r in self.log if m == "GET" and n == name]


@pytest.fixture
def hub():
    files = {"dpo.jsonl": b'{"chosen": [], "rejected": []}\n' * 5000,
             "rlaif.jsonl": "".join(f'{{"conversations": [{{"role": "user", "content": "问题 {i}"}}]}}\n'
                                    for i in range(3000)).encode()}
    server = Hub(files)
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_registry_and_list(capsys):
    for name in ("pretrain_t2t_mini", "sft_t2t_mini", "dpo", "rlaif", "agent_rl"):
        assert REGISTRY[name].filename == f"{name}.jsonl"
    text = format_list()
    assert all(name in text for name in REGISTRY) and HF_REPO in text and MS_REPO in text
    parser = argparse.ArgumentParser()
    add_download_parser(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["download", "--list"])
    args.func(args)
    assert "sft_t2t_mini" in capsys.readouterr().out
    with pytest.raises(MiniMindError, match="unknown dataset 'sft_huge'.*--list"):
        download("sft_huge", "x")
    with pytest.raises(MiniMindError, match="Hugging Face Hub only"):
        download("lora_exam", "x", source="modelscope")


def test_hub_download_through_hf_endpoint(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    path = download("dpo", tmp_path / "data", progress=False)
    assert path == tmp_path / "data" / "dpo.jsonl" and path.read_bytes() == hub.files["dpo.jsonl"]
    assert ("HEAD", "dpo.jsonl", None) in hub.log and hub.gets("dpo.jsonl") == [None]
    # A second run finds the complete file and does not fetch it again.
    assert download("dpo.jsonl", tmp_path / "data", progress=False) == path
    assert len(hub.gets("dpo.jsonl")) == 1
    with pytest.raises(MiniMindError, match="cannot resolve .HTTP 404: no such file in jingyaogong/minimind_dataset"):
        download("agent_rl", tmp_path / "data", progress=False)  # not on this server: 404


def test_hub_download_resumes_a_dropped_connection(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.cut.add("rlaif.jsonl")
    path = download("rlaif", tmp_path, progress=False)
    assert path.read_bytes() == hub.files["rlaif.jsonl"]
    half = len(hub.files["rlaif.jsonl"]) // 2
    assert hub.gets("rlaif.jsonl") == [None, f"bytes={half}-"]  # the rest only, not the whole file again


def test_hub_download_rejects_a_wrong_checksum(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.etags["dpo.jsonl"] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(MiniMindError, match=r"dpo.jsonl: download is corrupt \(sha256 "):
        download("dpo", tmp_path, progress=False)
    assert not (tmp_path / "dpo.jsonl").exists() and (tmp_path / "dpo.jsonl.bad").exists()


def test_modelscope_download_resumes_across_runs(hub, tmp_path):
    data = hub.files["rlaif.jsonl"]
    url = modelscope_url("rlaif.jsonl", endpoint=hub.url)
    assert url == f"{hub.url}/api/v1/datasets/{MS_REPO}/repo?Revision=master&FilePath=rlaif.jsonl"
    hub.cut.add("rlaif.jsonl")
    with pytest.raises(MiniMindError, match="stopped at .* run the same command again to resume"):
        http_download(url, tmp_path / "rlaif.jsonl", retries=0, progress=False)
    part = tmp_path / "rlaif.jsonl.part"
    assert part.stat().st_size == len(data) // 2 and not (tmp_path / "rlaif.jsonl").exists()
    # The next run asks for the rest only.
    path = download("rlaif", tmp_path, source="modelscope", endpoint=hub.url, progress=False,
                    sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data and not part.exists()
    assert hub.gets("rlaif.jsonl") == [None, f"bytes={len(data) // 2}-"]
    # Within one run, a dropped connection is retried from where it stopped.
    hub.cut.add("dpo.jsonl")
    path = download("dpo", tmp_path, source="modelscope", endpoint=hub.url, progress=False)
    assert path.read_bytes() == hub.files["dpo.jsonl"]
    assert hub.gets("dpo.jsonl") == [None, f"bytes={len(hub.files['dpo.jsonl']) // 2}-"]


def test_modelscope_checks_and_errors(hub, tmp_path):
    with pytest.raises(MiniMindError, match="download is corrupt .*sha256"):
        download("dpo", tmp_path, source="modelscope", endpoint=hub.url, progress=False, sha256="0" * 64)
    assert (tmp_path / "dpo.jsonl.bad").exists()
    with pytest.raises(MiniMindError, match="HTTP 404"):
        download("agent_rl", tmp_path, source="modelscope", endpoint=hub.url, progress=False)


def test_hub_download_resumes_across_runs_and_drops_a_stale_part(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    data = hub.files["rlaif.jsonl"]
    part, tag = tmp_path / "rlaif.jsonl.part", tmp_path / "rlaif.jsonl.part.etag"
    part.write_bytes(data[:1000])  # what an interrupted earlier run left
    tag.write_text(hub.etags["rlaif.jsonl"] + "\n")
    assert download("rlaif", tmp_path, progress=False).read_bytes() == data
    assert hub.gets("rlaif.jsonl") == ["bytes=1000-"] and not part.exists() and not tag.exists()
    # A partial file of another version of the file is not continued.
    (tmp_path / "dpo.jsonl.part").write_bytes(b"x" * 1000)
    (tmp_path / "dpo.jsonl.part.etag").write_text("an-older-etag\n")
    assert download("dpo", tmp_path, progress=False).read_bytes() == hub.files["dpo.jsonl"]
    assert hub.gets("dpo.jsonl") == [None]


def test_download_command(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    parser = argparse.ArgumentParser()
    add_download_parser(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["download", "dpo", "rlaif", "--out", str(tmp_path), "--quiet"])
    args.func(args)
    out = capsys.readouterr().out
    assert f"dpo.jsonl: {len(hub.files['dpo.jsonl']):,} bytes, checked" in out and "rlaif.jsonl" in out


def test_help_claims_only_the_checks_made():
    # No registry entry carries a sha256 and ModelScope sends none, so not every file can be sha256-checked.
    assert all(entry.sha256 is None for entry in REGISTRY.values())
    parser = argparse.ArgumentParser()
    add_download_parser(parser.add_subparsers(dest="action"))
    description = parser._subparsers._group_actions[0].choices["download"].description
    assert "every file is checked for size and sha256" not in description
    assert "sha256 only where one is known: the Hub's LFS hash (--source hf) or --sha256" in description
