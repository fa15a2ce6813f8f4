"""The folder that ships: a model that runs on its own, with what it needs and what it measured.

``model.onnx`` is the verified artifact with the task's reading appended in the graph: the frozen
head's class probabilities after the pooled embedding (``embedding-head``), softmax probabilities
after a classifier's logits (``classifier``); a fidelity task ships the embedding alone, a causal
LM its decoder with a KV cache (``logits`` and ``present.*`` from ``input_ids``, ``attention_mask``
and ``past_key_values.*``). Beside it:
the tokenizer files, ``labels.json``, ``plan.json``, ``metrics.json`` and a model card.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimtune.evaluators.hardware import current_target
from slimtune.export.size import file_sha256
from slimtune.plan import CompressionPlan
from slimtune.tasks import PreparedTask


def with_probabilities(model: onnx.ModelProto, task: PreparedTask) -> onnx.ModelProto:
    """Append the task's reading to the graph: ``probabilities`` (batch, classes) for the classification kinds."""
    graph = model.graph
    if task.kind not in ("embedding-head", "classifier"):
        return model  # embeddings and language models ship their outputs as they are
    (output,) = [o.name for o in graph.output]
    if task.kind == "embedding-head":
        graph.initializer.extend([numpy_helper.from_array(task.head_weight.T.astype(np.float32), "head.weight"),
                                  numpy_helper.from_array(task.head_bias.astype(np.float32), "head.bias")])
        graph.node.extend([helper.make_node("MatMul", [output, "head.weight"], ["head.scores"], name="/head/MatMul"),
                           helper.make_node("Add", ["head.scores", "head.bias"], ["logits"], name="/head/Add")])
        scores = "logits"
    elif task.kind == "classifier":
        scores = output
    else:
        return model
    graph.node.append(helper.make_node("Softmax", [scores], ["probabilities"], axis=-1, name="/head/Softmax"))
    graph.output.append(helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", "classes"]))
    return model


def model_card(name: str, trial: str, task: PreparedTask, figures: dict[str, Any], fp32: dict[str, float],
               plan_summary: str, outputs: list[str], tokens: dict[str, Any]) -> str:
    """A short Markdown card: what was compressed how, figures against fp32, how to run it."""
    rows = [f"| {k} | {v['value']:.4f} {v['unit']} | " + (f"{fp32[k]:.4f}" if k in fp32 else "-") + " |"
            for k, v in figures.items()]
    run = GENERATE_SNIPPET if task.kind == "causal-lm" else [
        "Inputs `input_ids` and `attention_mask` (int64, batch x tokens) from `tokenizer.json`; outputs "
        + ", ".join(f"`{o}`" for o in outputs) + ". See `metrics.json` for the hardware the figures come from.",
        "", "```python",
        "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "tok = Tokenizer.from_file('tokenizer.json')",
        f"tok.enable_truncation({tokens['max_length']}); "
        f"tok.enable_padding(pad_id={tokens['pad_id']}, pad_token={tokens['pad_token']!r})",
        "enc = tok.encode_batch(['first text', 'second text'])",
        "feeds = {'input_ids': np.array([e.ids for e in enc], np.int64),",
        "         'attention_mask': np.array([e.attention_mask for e in enc], np.int64)}",
        "outputs = ort.InferenceSession('model.onnx').run(None, feeds)",
        "```"]
    return "\n".join([
        f"# {name} / {trial}", "",
        f"Compressed with slimtune: task kind `{task.kind}`, searched metric `{task.metric}`.", "",
        "## What was compressed, how", "", plan_summary, "",
        "## Figures (re-measured at export) against the uncompressed model in the same search", "",
        "| figure | this model | fp32 |", "|---|---|---|", *rows, "",
        "## Run it", "", *run, ""])


GENERATE_SNIPPET = [
    "A decoder with a KV cache: `input_ids`, `attention_mask` (int64) and `past_key_values.<block>.key/value` "
    "(float32, batch x kv heads x past tokens x head size; zero past tokens for the prompt) in; `logits` and "
    "`present.<block>.key/value` out. Greedy generation:",
    "", "```python",
    "import numpy as np, onnxruntime as ort",
    "from tokenizers import Tokenizer",
    "tok, sess = Tokenizer.from_file('tokenizer.json'), ort.InferenceSession('model.onnx')",
    "names = [o.name for o in sess.get_outputs()]",
    "ids = np.array([tok.encode('def fibonacci(n):').ids], np.int64)",
    "feeds = {'input_ids': ids, 'attention_mask': np.ones_like(ids)}",
    "feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)",
    "              for i in sess.get_inputs() if i.name.startswith('past_key_values.')})",
    "generated = []",
    "for _ in range(32):",
    "    logits, *cache = sess.run(names, feeds)",
    "    generated.append(int(logits[0, -1].argmax()))",
    "    total = feeds['attention_mask'].shape[1] + 1",
    "    feeds = {'input_ids': np.array([[generated[-1]]], np.int64), 'attention_mask': np.ones((1, total), np.int64),",
    "             **{n.replace('present.', 'past_key_values.', 1): c for n, c in zip(names[1:], cache)}}",
    "print(tok.decode(generated))",
    "```"]


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _plan_summary(plan: CompressionPlan) -> str:
    formats = Counter(f"{spec.format}" + (f" ({spec.method}, block {spec.block_size})" if spec.is_blockwise else "")
                      for spec in plan.quantize.values())
    lines = [f"- weights: {', '.join(f'{n} x {f}' for f, n in formats.most_common()) or 'all fp32'}"]
    if plan.depth_prune:
        lines.append(f"- blocks removed: {', '.join(plan.depth_prune)}")
    if plan.head_prune:
        lines.append(f"- attention heads removed (fraction per block): {dict(plan.head_prune)}")
    if plan.ffn_prune:
        lines.append(f"- FFN neurons removed (fraction per block): {dict(plan.ffn_prune)}")
    if plan.low_rank:
        lines.append(f"- low-rank ({plan.low_rank_method}), rank fraction per layer: {dict(plan.low_rank)}")
    if plan.recovery is not None:
        lines.append(f"- distillation recovery: {plan.recovery.steps} steps of {plan.recovery.batch_size} texts")
    return "\n".join(lines)


def logged_figures(row: dict[str, str] | None, keys) -> dict[str, float]:
    """The figures of a ``pareto.csv`` / ``trials.csv`` row among ``keys`` (the ones it has)."""
    return {k: float(row[k]) for k in keys if row and row.get(k)}


def write_shipped(folder: Path, artifact: Path, row: dict[str, str], plan: CompressionPlan, task, tokenizer,
             figures: dict[str, dict[str, Any]], fp32: dict[str, float], name: str, digest: str) -> None:
    """Write the shipped folder; ``fp32``: the search's uncompressed figures, for the model card."""
    shipped = with_probabilities(onnx.load(str(artifact)), task)
    outputs = [o.name for o in shipped.graph.output]
    onnx.save_model(shipped, str(folder / "model.onnx"))
    artifact.unlink()
    tokenizer.save_pretrained(folder)
    (folder / "plan.json").write_text(plan.dumps() + "\n")
    if task.label_names:
        write_json(folder / "labels.json", list(task.label_names))
    target = current_target()
    tokens = {"max_length": int(task.input_ids.shape[1]), "pad_id": int(tokenizer.pad_token_id),
              "pad_token": str(tokenizer.pad_token)}
    write_json(folder / "metrics.json", {
        "search": name, "trial": row["trial"], "task_kind": task.kind, "metric": task.metric,
        "export": figures, "export_hardware": target.as_dict(), "export_hardware_target": target.key,
        "search_figures": logged_figures(row, figures), "search_hardware_target": row.get("hardware"),
        "fp32_search_figures": fp32, "artifact_sha256": digest, "model_sha256": file_sha256(folder / "model.onnx"),
        "outputs": outputs, "tokenizer": tokens,
    })
    (folder / "README.md").write_text(model_card(name, row["trial"], task, figures, fp32, _plan_summary(plan),
                                                 outputs, tokens))
