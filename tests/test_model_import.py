"""Models in SQL (llm_model_config, llm_model, llm_param_names, ...) and `pg-llm model import/export`:
Hugging Face GPT-2 checkpoints round-trip bit-exactly; bad checkpoints change nothing."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads exist here

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from safetensors.numpy import save_file
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from pg_llm.config import STANDARD, GPT2Config
from pg_llm.loader.checkpoint import CheckpointError
from pg_llm.loader.model import export_model, import_model
from pg_llm.loader.tensors import read_tensor, tensor_id

from conftest import close

TINY = dict(n_layer=2, n_head=3, n_embd=48, n_positions=37, vocab_size=301)
PG_CLI = [sys.executable, "-c", "import sys; from pg_llm.cli import main; sys.exit(main())"]


def tiny_model(seed: int = 0, **over: object) -> GPT2LMHeadModel:
    """A tiny GPT-2 with every parameter random (LayerNorm too, so nothing is a trivial 0/1)."""
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(HFConfig(**{**TINY, **over}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".ln_" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def params(m: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """pg_llm names -> float32 arrays."""
    return {k.removeprefix("transformer."): v.detach().float().numpy() for k, v in m.state_dict().items()
            if k != "lm_head.weight"}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def counts(conn: psycopg.Connection) -> tuple:
    return conn.execute("SELECT (SELECT count(*) FROM llm_tensor), (SELECT count(*) FROM llm_tile), "
                        "(SELECT count(*) FROM llm_model), (SELECT count(*) FROM llm_model_config)").fetchone()


def stored(conn: psycopg.Connection, model: str) -> dict[str, np.ndarray]:
    rows = conn.execute("SELECT name, id FROM llm_tensor WHERE model = %s AND role = 'param'", (model,)).fetchall()
    return {n: read_tensor(conn, i) for n, i in rows}


def hf_config(**over: object) -> dict:
    return json.loads(HFConfig(**{**TINY, **over}).to_json_string())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT2LMHeadModel]:
    d = tmp_path_factory.mktemp("tiny") / "hf"
    m = tiny_model()
    m.save_pretrained(d)
    return d, m


@pytest.fixture(scope="module")
def imported(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel]) -> str:
    import_model(conn, tiny[0], "tiny", tile=(16, 32))  # small ragged tiles: 301 x 48 is 19 x 2 tiles
    return "tiny"


# ---- SQL: configs, param names, models ------------------------------------------------------------------

def test_standard_configs(conn: psycopg.Connection) -> None:
    rows = conn.execute("SELECT name, n_layer, n_head, n_embd, n_ctx, vocab_size, tokenizer, tied_embeddings, "
                        "layer_norm_epsilon, activation, dropout FROM llm_model_config").fetchall()
    got = {r[0]: r[1:] for r in rows}
    for name, c in STANDARD.items():
        assert got[name] == (c.n_layer, c.n_head, c.n_embd, 1024, 50257, "gpt2", True, 1e-5, "gelu_new", 0.1)
    assert got["gpt2-small"][:3] == (12, 12, 768) and got["gpt2-xl"][:3] == (48, 25, 1600)


@pytest.mark.parametrize("config", ["gpt2-small", "gpt2-xl", "tiny-untied"])
def test_param_names_match_python(conn: psycopg.Connection, config: str) -> None:
    cfg = STANDARD.get(config) or GPT2Config(n_layer=2, n_head=3, n_embd=48, n_ctx=37, vocab_size=301,
                                             tied_embeddings=False)
    if config not in STANDARD:
        conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size, tied_embeddings)"
                     " VALUES (%s, 2, 3, 48, 37, 301, FALSE) ON CONFLICT DO NOTHING", (config,))
    rows = conn.execute("SELECT name, shape FROM llm_internal.llm_param_names(%s)", (config,)).fetchall()
    assert [(n, tuple(s)) for n, s in rows] == list(cfg.param_shapes().items())
    if config == "gpt2-small":
        assert len(rows) == 148 and cfg.n_params() == 124_439_808
        assert rows[0] == ("wte.weight", [50257, 768]) and rows[4] == ("h.0.attn.c_attn.weight", [768, 2304])
    if config == "tiny-untied":
        assert rows[-1] == ("lm_head.weight", [301, 48])


def test_model_sql_errors(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match='unknown model "nope"') as e:
        conn.execute("SELECT llm_internal.llm_model_get('nope')")
    assert "Known models" in e.value.diag.message_hint
    with pytest.raises(psycopg.errors.RaiseException, match='unknown model config "gpt5"') as e:
        conn.execute("SELECT llm_model_create('m', 'gpt5')")
    assert "gpt2-small" in e.value.diag.message_hint
    with pytest.raises(psycopg.errors.RaiseException, match="unknown model config"):
        conn.execute("SELECT * FROM llm_internal.llm_param_names('gpt5')")
    with pytest.raises(psycopg.errors.RaiseException, match='unknown model "nope"'):
        conn.execute("SELECT llm_model_drop('nope')")
    assert conn.execute("SELECT llm_model_drop('nope', TRUE)").fetchone()[0] == 0


def test_model_create_check_drop(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT * FROM llm_model_create('empty')").fetchone()
    assert row[:2] == ("empty", "gpt2-small") and row[3] == 0  # the default config, step 0
    assert conn.execute("SELECT (llm_internal.llm_model_get('empty')).n_embd").fetchone()[0] == 768
    with pytest.raises(psycopg.errors.RaiseException, match='model "empty" already exists'):
        conn.execute("SELECT llm_model_create('empty')")
    with pytest.raises(psycopg.errors.RaiseException, match="148 missing, e.g. wte.weight, wpe.weight"):
        conn.execute("SELECT llm_internal.llm_model_check('empty')")
    assert conn.execute("SELECT llm_model_drop('empty')").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_model WHERE name = 'empty'").fetchone()[0] == 0


# ---- import / export ------------------------------------------------------------------------------------

def test_import_bit_exact(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel], imported: str) -> None:
    want = params(tiny[1])
    got = stored(conn, imported)
    assert sorted(got) == sorted(want) and len(got) == 4 + 12 * 2
    for n, a in want.items():
        assert got[n].shape == a.shape, n
        assert np.array_equal(bits(got[n]), bits(a)), n
    # not a standard size, so the config is registered under the model's name, from config.json
    cfg = conn.execute("SELECT name, n_layer, n_head, n_embd, n_ctx, vocab_size "
                       "FROM llm_internal.llm_model_get('tiny')").fetchone()
    assert cfg == ("tiny", 2, 3, 48, 37, 301)
    assert conn.execute("SELECT (llm_internal.llm_model_check('tiny', TRUE)).name").fetchone()[0] == "tiny"
    row = conn.execute("SELECT config, tensors, params FROM llm_models WHERE name = 'tiny'").fetchone()
    assert row == ("tiny", 28, GPT2Config(n_layer=2, n_head=3, n_embd=48, n_ctx=37, vocab_size=301).n_params())
    assert conn.execute("SELECT tile FROM llm_tensor WHERE id = %s",
                        (tensor_id(conn, "tiny", "wte.weight"),)).fetchone()[0] == [16, 32]


def test_export_reloads_in_transformers(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel],
                                        imported: str, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    r = export_model(conn, imported, out)
    assert r.tensors == 28 and (out / "config.json").exists()
    m2 = GPT2LMHeadModel.from_pretrained(out).eval()
    sd1, sd2 = tiny[1].state_dict(), m2.state_dict()
    assert sorted(sd1) == sorted(sd2)
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype == torch.float32 and torch.equal(sd1[k], sd2[k]), k
    assert m2.lm_head.weight.data_ptr() == m2.transformer.wte.weight.data_ptr()  # still tied
    x = torch.randint(0, 301, (2, 37))
    with torch.no_grad():
        assert torch.equal(tiny[1](x).logits, m2(x).logits)
    with pytest.raises(FileExistsError):
        export_model(conn, imported, out)
    export_model(conn, imported, out, force=True)
    # and the export imports again to the same bits
    import_model(conn, out, "tiny_again")
    again, first = stored(conn, "tiny_again"), stored(conn, imported)
    assert all(np.array_equal(bits(again[n]), bits(first[n])) for n in first)
    # a non-standard config is registered under the model's name, with the same values
    cols = "n_layer, n_head, n_embd, n_ctx, vocab_size, tied_embeddings, layer_norm_epsilon, activation, dropout"
    assert (conn.execute(f"SELECT {cols} FROM llm_internal.llm_model_get('tiny_again')").fetchone()
            == conn.execute(f"SELECT {cols} FROM llm_internal.llm_model_get('tiny')").fetchone())
    assert conn.execute("SELECT config FROM llm_model WHERE name = 'tiny_again'").fetchone()[0] == "tiny_again"
    conn.execute("SELECT llm_model_drop('tiny_again')")


def test_replace(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel], tmp_path: Path) -> None:
    import_model(conn, tiny[0], "rep")
    before = counts(conn)
    with pytest.raises(ValueError, match="already exists; pass --replace"):
        import_model(conn, tiny[0], "rep")
    with pytest.raises(CheckpointError, match="differs from the standard config 'gpt2-small'"):
        import_model(conn, tiny[0], "gpt2-small")  # would overwrite the standard row
    assert counts(conn) == before
    d = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(d)
    import_model(conn, d, "rep", replace=True)
    assert counts(conn) == before
    got = stored(conn, "rep")
    assert all(np.array_equal(bits(got[n]), bits(a)) for n, a in params(tiny_model(seed=1)).items())
    conn.execute("SELECT llm_model_drop('rep')")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoints(conn: psycopg.Connection, tmp_path: Path, dtype: torch.dtype) -> None:
    m = tiny_model(seed=2).to(dtype)
    m.save_pretrained(tmp_path / "half")
    name = f"half_{str(dtype)[6:]}"
    import_model(conn, tmp_path / "half", name)
    got = stored(conn, name)
    for k, v in m.state_dict().items():
        if k != "lm_head.weight":
            assert np.array_equal(bits(got[k.removeprefix("transformer.")]), bits(v.float().numpy())), k


def test_pytorch_bin_old_style(conn: psycopg.Connection, tmp_path: Path) -> None:
    """pytorch_model.bin with old GPT-2 names: no 'transformer.' prefix, attn.bias/masked_bias buffers."""
    m = tiny_model(seed=3)
    sd = {k.removeprefix("transformer."): v for k, v in m.state_dict().items()}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(37, 37)).view(1, 1, 37, 37)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(hf_config()))
    import_model(conn, d, "from_bin")
    got = stored(conn, "from_bin")
    assert all(np.array_equal(bits(got[n]), bits(a)) for n, a in params(m).items())


def test_npz(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel], imported: str, tmp_path: Path) -> None:
    p = tmp_path / "w.npz"
    np.savez(p, **params(tiny[1]))
    import_model(conn, p, "from_npz", config="tiny")
    got = stored(conn, "from_npz")
    assert all(np.array_equal(bits(got[n]), bits(a)) for n, a in params(tiny[1]).items())
    before = counts(conn)
    with pytest.raises(CheckpointError, match="match no standard config: pass --config"):
        import_model(conn, p, "npz_no_config")
    with pytest.raises(CheckpointError, match="unknown model config 'gpt5'"):
        import_model(conn, p, "npz_bad_config", config="gpt5")
    with pytest.raises(CheckpointError, match="missing tensor"):
        import_model(conn, p, "npz_small", config="gpt2-small")
    assert counts(conn) == before


def test_sharded_and_single_file(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel],
                                 tmp_path: Path) -> None:
    ps = {"transformer." + k: v for k, v in params(tiny[1]).items()}
    names = sorted(ps)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    d = tmp_path / "sharded"
    d.mkdir()
    for f, ns in shards.items():
        save_file({n: ps[n] for n in ns}, str(d / f), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    (d / "config.json").write_text(json.dumps(hf_config()))
    import_model(conn, d, "sharded")
    got = stored(conn, "sharded")
    assert all(np.array_equal(bits(got[n]), bits(a)) for n, a in params(tiny[1]).items())
    import_model(conn, tiny[0] / "model.safetensors", "single")  # config.json beside the file is used
    assert conn.execute("SELECT config FROM llm_model WHERE name = 'single'").fetchone()[0] == "single"


def _bad_dir(tmp_path: Path, tensors: dict[str, np.ndarray], **cfg: object) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    save_file({"transformer." + k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config(**cfg)))
    return d


@pytest.mark.parametrize("case", ["no_path", "truncated", "garbage", "missing", "shape", "nan", "inf_f64",
                                  "unexpected", "untied_head", "config_json"])
def test_errors_change_nothing(conn: psycopg.Connection, tiny: tuple[Path, GPT2LMHeadModel], imported: str,
                               tmp_path: Path, case: str) -> None:
    ps = params(tiny[1])
    if case == "no_path":
        path, msg = tmp_path / "nowhere", "nowhere does not exist: model weights are a Hugging Face directory"
    elif case in ("truncated", "garbage"):
        path = tmp_path / "copy"
        shutil.copytree(tiny[0], path)
        f = path / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[:-100] if case == "truncated" else b"\x07" * 64)
        msg = "truncated safetensors file" if case == "truncated" else "corrupt or truncated safetensors"
    elif case == "missing":
        path, msg = _bad_dir(tmp_path, {k: v for k, v in ps.items() if k != "h.1.mlp.c_fc.bias"}), \
            r"1 missing tensor\(s\): h.1.mlp.c_fc.bias"
    elif case == "shape":
        path, msg = _bad_dir(tmp_path, {**ps, "wpe.weight": np.zeros((40, 48), np.float32)}), \
            r"wpe.weight has shape \(40, 48\), expected \(37, 48\)"
    elif case == "nan":
        bad = ps["h.0.attn.c_attn.weight"].copy()
        bad[3, 5] = np.nan
        path, msg = _bad_dir(tmp_path, {**ps, "h.0.attn.c_attn.weight": bad}), \
            "'h.0.attn.c_attn.weight' has 1 NaN/Inf"
    elif case == "inf_f64":  # fits float64, overflows float32
        big = ps["ln_f.bias"].astype(np.float64)
        big[0] = 1e300
        path, msg = _bad_dir(tmp_path, {**ps, "ln_f.bias": big}), "'ln_f.bias' has 1 NaN/Inf"
    elif case == "unexpected":
        path, msg = _bad_dir(tmp_path, {**ps, "h.2.ln_1.weight": ps["h.1.ln_1.weight"]}), \
            r"1 unexpected tensor\(s\): h.2.ln_1.weight"
    elif case == "untied_head":
        d = _bad_dir(tmp_path, ps)
        save_file({"transformer." + k: v for k, v in ps.items()} | {"lm_head.weight": ps["wte.weight"] + 1},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        path, msg = d, "lm_head.weight differs from wte.weight"
    else:
        path, msg = _bad_dir(tmp_path, ps, activation_function="relu"), "only gelu_new"
    before = counts(conn)
    with pytest.raises(CheckpointError, match=msg):
        import_model(conn, path, "broken")
    assert counts(conn) == before
    # the same failure over an existing model with --replace keeps the old model intact
    with pytest.raises(CheckpointError, match=msg):
        import_model(conn, path, imported, replace=True)
    assert counts(conn) == before
    assert conn.execute("SELECT (llm_internal.llm_model_check(%s, TRUE)).name", (imported,)).fetchone()[0] == "tiny"


def test_untied_model_round_trip(conn: psycopg.Connection, tmp_path: Path) -> None:
    m = tiny_model(seed=4, tie_word_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.copy_(torch.randn_like(m.lm_head.weight))
    m.save_pretrained(tmp_path / "untied")
    import_model(conn, tmp_path / "untied", "untied")
    assert conn.execute("SELECT tied_embeddings FROM llm_internal.llm_model_get('untied')").fetchone()[0] is False
    export_model(conn, "untied", tmp_path / "out")
    m2 = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert not torch.equal(m2.lm_head.weight, m2.transformer.wte.weight)
    ids = [5, 17, 3, 42]  # the logits come from lm_head, in every forward (the training one and the cached one)
    with torch.no_grad():
        want = m(torch.tensor([ids])).logits[0].numpy()
    got = np.array([r[0] for r in conn.execute("SELECT logits FROM llm_logits_all('untied', %s) ORDER BY pos",
                                               (ids,)).fetchall()])
    close(got, want)
    close(np.array(conn.execute("SELECT llm_logits('untied', %s)", (ids,)).fetchone()[0]), want[-1])
    loss = conn.execute("SELECT llm_loss('untied', %s, %s)", (ids[:-1], ids[1:])).fetchone()[0]
    with torch.no_grad():
        want_loss = float(torch.nn.functional.cross_entropy(m(torch.tensor([ids[:-1]])).logits[0],
                                                            torch.tensor(ids[1:])))
    assert abs(loss - want_loss) < 1e-5


def test_cli(dsn: str, tiny: tuple[Path, GPT2LMHeadModel], tmp_path: Path) -> None:
    env = {**os.environ, "PG_LLM_DSN": dsn}
    for args in (["model", "--help"], ["model", "import", "--help"], ["model", "export", "--help"]):
        r = subprocess.run(PG_CLI + args, capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "usage: pg-llm model" in r.stdout, r.stderr
    r = subprocess.run(PG_CLI + ["model", "import", "--name", "cli", str(tiny[0])], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "imported model 'cli' (config cli): 28 tensors" in r.stdout, r.stderr
    assert "import cli: 100%" in r.stderr  # the progress bar
    r = subprocess.run(PG_CLI + ["model", "import", "--name", "cli", str(tiny[0]), "-q"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and "already exists; pass --replace" in r.stderr
    r = subprocess.run(PG_CLI + ["model", "import", "--name", "cli2", "--config", "gpt2-small", str(tiny[0])],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "does not match config 'gpt2-small'" in r.stderr
    r = subprocess.run(PG_CLI + ["model", "export", "--name", "cli", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and (tmp_path / "o" / "model.safetensors").exists(), r.stderr
    r = subprocess.run(PG_CLI + ["model", "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "cli\tconfig=cli\tstep=0\ttensors=28" in r.stdout, r.stderr
    r = subprocess.run(PG_CLI + ["model", "export", "--name", "nope", str(tmp_path / "n"), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and 'unknown model "nope"' in r.stderr
    r = subprocess.run(PG_CLI + ["model", "drop", "--name", "cli"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "28 tensors" in r.stdout, r.stderr


@pytest.mark.slow
def test_gpt2_small_round_trip(conn: psycopg.Connection, tmp_path: Path) -> None:
    """A random model of GPT-2 small's size (124M parameters, 500 MB) through import and export."""
    torch.manual_seed(0)
    m = GPT2LMHeadModel(HFConfig())
    m.save_pretrained(tmp_path / "small")
    r = import_model(conn, tmp_path / "small", "small")
    assert r.config == "gpt2-small" and r.tensors == 148 and r.params == 124_439_808
    export_model(conn, "small", tmp_path / "out")
    sd = GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    conn.execute("SELECT llm_model_drop('small')")


def test_export_writes_the_tokenizer_transformers_loads(db: psycopg.Connection, imported: str,
                                                        tmp_path: Path) -> None:
    """Beside the weights, the config's tokenizer as GPT-2 tokenizer files: AutoTokenizer encodes like llm_encode
    (an export without them made transformers build an empty tokenizer: 'Hello world' -> [])."""
    from transformers import AutoTokenizer

    r = export_model(db, imported, tmp_path / "with_tok")
    assert r.tokenizer == "gpt2"
    tok = AutoTokenizer.from_pretrained(tmp_path / "with_tok")
    for text in ["Hello world", " naïve café, 12,345 tokens!\n\n  indented<|endoftext|>x", "日本語 and émojis 🤖"]:
        ids = db.execute("SELECT llm_encode(%s)", (text,)).fetchone()[0]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and tok.model_max_length == 37


def test_an_export_generates_in_a_transformers_pipeline(db: psycopg.Connection, tmp_path: Path) -> None:
    """pipeline('text-generation', model=export_dir) loads weights and tokenizer and decodes greedily what
    llm_generate does (a model with GPT-2's vocabulary, initialized in SQL)."""
    from transformers import pipeline

    db.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
               "VALUES ('pipe', 2, 2, 32, 32, 50257) ON CONFLICT DO NOTHING")
    db.execute("SELECT llm_model_init('pipe_m', 'pipe', seed => 4)")
    export_model(db, "pipe_m", tmp_path / "pipe")
    gen = pipeline("text-generation", model=str(tmp_path / "pipe"), device="cpu")
    prompt = "To be, or not"
    got = gen(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ours = db.execute("SELECT llm_generate('pipe_m', %s, max_new_tokens => 6, temperature => 0)",
                      (prompt,)).fetchone()[0]
    assert got == prompt + ours and len(ours) > 0
    db.execute("SELECT llm_model_drop('pipe_m')")
