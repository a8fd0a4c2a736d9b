"""`adapterops batch`: manifests over the fixture adapters, idempotent reruns, --check, failures, shards."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, file_hashes, read_all, tree_hash

from adapterops.batch.manifest import parse_manifest, shard
from adapterops.batch.runner import run_batch
from adapterops.cli import cli
from adapterops.errors import AdapteropsError

MANIFEST = """\
[defaults]
device = "cpu"

[[job]]
name = "baked"
op = "rescale"
adapter = "adapters/llama-*/"
output = "out/{name}-baked"
to = "standard"
bake = true

[[job]]
name = "r4"
op = "rerank"
adapter = "adapters/llama-lora"
output = "out/{name}-r4"
rank = 4

[[job]]
name = "both"
op = "stack"
adapters = ["adapters/llama-lora", "adapters/llama-rslora-patterns"]
weights = [1.0, 0.5]
output = "out/{job}"

[[job]]
name = "merged"
op = "merge"
base = "models/llama-tied"
adapter = "adapters/llama-lora"
output = "out/{name}-merged"

[[job]]
name = "unmerged"
op = "unmerge"
merged = "golden-merged"
adapters = ["adapters/llama-lora"]
output = "out/unmerged"

[[job]]
name = "nf4"
op = "quantize"
base = "models/gpt2"
output = "out/{name}-nf4"
blocksize = 128

[[job]]
name = "back"
op = "dequantize"
base = "nf4-in"
output = "out/{name}-bf16"
dtype = "bfloat16"

[[job]]
name = "sft"
op = "extract"
base = "models/llama-tied"
tuned = "golden-merged"
output = "out/extracted"
rank = 8

[[job]]
name = "report"
op = "analyze"
adapter = "adapters/gpt2-*/"
base = "models/gpt2"
output = "reports/{name}.json"
"""


@pytest.fixture
def workspace(tmp_path):
    """A repo-like folder: adapters/, models/, a merged checkpoint, an NF4 checkpoint and the manifest."""
    import adapterops
    from adapterops.ops.quantize import quantize

    shutil.copytree(ADAPTERS, tmp_path / "adapters")
    shutil.copytree(MODELS, tmp_path / "models")
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "golden-merged")
    quantize(MODELS / "llama-tied", tmp_path / "nf4-in")
    (tmp_path / "m.toml").write_text(MANIFEST)
    return tmp_path


def batch(ws, *args):
    """Run the CLI in the workspace and return (exit code, JSON report)."""
    res = CliRunner().invoke(cli, ["batch", str(ws / "m.toml"), "--json", "-q", "-j", "1", *args])
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.stdout)


def test_every_operation_runs_and_reruns_skip(workspace):
    code, report = batch(workspace)
    assert code == 0, [t for t in report["tasks"] if t["error"]]
    ops = {t["op"] for t in report["tasks"]}
    assert ops == {"rescale", "rerank", "stack", "merge", "unmerge", "quantize", "dequantize", "extract", "analyze"}
    assert report["counts"] == {"done": len(report["tasks"])} and len(report["tasks"]) == 7 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 2
    out = workspace / "out"
    # the outputs are the library calls' outputs, e.g. the batch merge equals PEFT's golden bytes
    assert tree_hash(out / "llama-lora-merged") != "" and read_all(out / "llama-lora-merged").keys() == read_all(workspace / "golden-merged").keys()
    assert json.loads((workspace / "reports" / "gpt2-lora.json").read_text())["schema"] == "adapterops.analyze/1"
    record = json.loads((out / "llama-lora-r4" / ".adapterops-provenance.json").read_text())
    assert record["op"] == "rerank" and record["options"] == {"rank": 4} and record["adapterops"]
    before = tree_hash(out)
    code, again = batch(workspace)
    assert code == 0 and again["counts"] == {"skipped": len(report["tasks"])}
    assert tree_hash(out) == before  # nothing rewritten
    code, checked = batch(workspace, "--check")
    assert code == 0 and checked["counts"] == {"current": len(report["tasks"])}


def test_check_reports_stale_and_missing_and_writes_nothing(workspace):
    batch(workspace)
    cfg = workspace / "adapters" / "llama-lora" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data["lora_alpha"] = 32
    cfg.write_text(json.dumps(data))
    shutil.rmtree(workspace / "out" / "llama-dora-baked")
    before = tree_hash(workspace / "out")
    code, report = batch(workspace, "--check")
    assert code == 1
    status = {t["task"]: t["status"] for t in report["tasks"]}
    assert status["baked:llama-dora"] == "missing"
    assert {k for k, v in status.items() if v == "stale"} == {"baked:llama-lora", "r4:llama-lora", "both:both", "merged:llama-lora", "unmerged:golden-merged"}
    assert tree_hash(workspace / "out") == before
    code, report = batch(workspace)  # a real run brings exactly those up to date
    assert code == 0 and report["counts"] == {"done": 6, "skipped": len(report["tasks"]) - 6}


def test_a_failing_job_leaves_the_others_done(workspace):
    (workspace / "m.toml").write_text(MANIFEST + '\n[[job]]\nname = "broken"\nop = "rerank"\nadapter = "adapters/llama-lora"\n'
                                      'output = "out/broken"\nrank = 4\npad_to = 2\n')
    code, report = batch(workspace)
    assert code == 1
    failed = [t for t in report["tasks"] if t["status"] == "failed"]
    assert [t["task"] for t in failed] == ["broken:llama-lora"] and "--pad-to 2" in failed[0]["error"]
    assert sum(t["status"] == "done" for t in report["tasks"]) == len(report["tasks"]) - 1
    assert not (workspace / "out" / "broken").exists()


def test_shards_cover_the_manifest_exactly_once(workspace):
    tasks = parse_manifest(workspace / "m.toml")
    ids = [t.id for t in tasks]
    for n in (2, 3):
        parts = [[t.id for t in shard(tasks, i, n)] for i in range(1, n + 1)]
        assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    code1, r1 = batch(workspace, "--shard", "1/2")
    code2, r2 = batch(workspace, "--shard", "2/2")
    assert code1 == code2 == 0
    assert sorted(t["task"] for t in r1["tasks"] + r2["tasks"]) == sorted(ids)
    code, again = batch(workspace, "--check")
    assert code == 0  # together the two shards made every output


def test_parallel_jobs_give_the_same_outputs(workspace):
    """Byte for byte, except extract: its SVD runs in LAPACK, whose last bits depend on the thread count (workers
    get cores / jobs threads); there the factors' ΔW must agree to 1e-5 relative."""
    manifest = MANIFEST.replace('adapter = "adapters/llama-*/"', 'adapter = "adapters/llama-lora*/"')
    (workspace / "m.toml").write_text(manifest)
    result = run_batch(workspace / "m.toml", jobs=2, progress=False)
    assert result.ok, [t.error for t in result.tasks if t.error]
    first = file_hashes(workspace / "out")
    shutil.copytree(workspace / "out" / "extracted", workspace / "extracted-parallel")
    shutil.rmtree(workspace / "out")
    shutil.rmtree(workspace / "reports")
    result = run_batch(workspace / "m.toml", jobs=1, progress=False)
    assert result.ok
    second = file_hashes(workspace / "out")
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k] and not k.startswith("extracted/")] == []
    a, b = read_all(workspace / "extracted-parallel"), read_all(workspace / "out" / "extracted")
    for k in a:
        if k.endswith("lora_A.weight"):
            bk = k.replace("lora_A", "lora_B")
            da, db = b_a(a, bk, k), b_a(b, bk, k)
            assert (da - db).norm() <= 1e-5 * db.norm(), k


def b_a(tensors, b_key, a_key):
    """ΔW = B·A of one module of an adapter's tensors (scale 1, as extract writes)."""
    return tensors[b_key].double() @ tensors[a_key].double()


BAD = [
    ('[[job]]\nname = "a"\nop = "frobnicate"\noutput = "o"\n', "line 3: job 'a': unknown op 'frobnicate'"),
    ('[[job]]\nname = "a"\nop = "rerank"\nadapter = "adapters/llama-lora"\noutput = "o"\nrnak = 4\n', "line 6: job 'a': unknown key 'rnak'"),
    ('[[job]]\nname = "a"\nop = "rerank"\nadapter = "adapters/llama-lora"\noutput = "o"\nrank = "4"\n', "line 6: job 'a': rank must be an integer"),
    ('[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/none-*/"\noutput = "o/{name}"\n', "line 4: job 'a': adapter 'adapters/none-*/' matches nothing"),
    ('[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/*/"\noutput = "o"\n', "line 5: job 'a': adapter matches 11 inputs: the output needs {name}"),
    ('[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/llama-lora"\n', "each job needs an output pattern"),
    ('[[job]]\nname = "a"\nop = "merge"\nadapter = "adapters/llama-lora"\noutput = "o"\n', "op 'merge' needs base"),
    ('[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/llama-lora"\noutput = "o"\n'
     '[[job]]\nname = "b"\nop = "rerank"\nadapter = "adapters/llama-lora"\noutput = "o"\nrank = 2\n', "line 10: job 'b': jobs 'a' and 'b' both write"),
    ('[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/llama-lora"\noutput = "o"\n'
     '[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/llama-dora"\noutput = "p"\n', "line 7: job 'a': two jobs are named 'a'"),
    ('[[job]\nname = "a"\n', "invalid TOML"),
    ('[jobs]\n', "unknown top-level key 'jobs'"),
    ('[defaults]\nfrob = 1\n[[job]]\nname = "a"\nop = "rescale"\nadapter = "adapters/llama-lora"\noutput = "o"\n', "line 2: unknown default 'frob'"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_manifests_fail_before_any_work(text, message, tmp_path):
    shutil.copytree(ADAPTERS, tmp_path / "adapters")
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(AdapteropsError, match=message.replace("{", r"\{").replace("}", r"\}").replace("*", r"\*")):
        parse_manifest(tmp_path / "m.toml")
    res = CliRunner().invoke(cli, ["batch", str(tmp_path / "m.toml")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and str(tmp_path / "m.toml") in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "m.toml"]


def test_an_existing_foreign_output_is_not_overwritten(workspace):
    (workspace / "out" / "extracted").mkdir(parents=True)
    (workspace / "out" / "extracted" / "notes.txt").write_text("mine")
    code, report = batch(workspace)
    assert code == 1
    failed = [t for t in report["tasks"] if t["status"] == "failed"]
    assert [t["task"] for t in failed] == ["sft:golden-merged"] and "not written by adapterops batch" in failed[0]["error"]
    assert (workspace / "out" / "extracted" / "notes.txt").read_text() == "mine"
