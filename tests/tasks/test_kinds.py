"""The three task kinds end to end below the search: detection, preparation, scoring of exported files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from slimtune.config import ModelConfig, TaskConfig
from slimtune.evaluators.quality import measure_quality
from slimtune.export import build_artifact
from slimtune.model import ModelLoadError, load_model, resolve_model_source
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.tasks import DataError, PreparedTask, choose_task, load_texts, prepare_task
from slimtune.tasks.fidelity import neighbour_overlap


def _prepare(model_dir: Path, task_cfg: TaskConfig, cache: Path, max_length: int = 32):
    model_cfg = ModelConfig(name=str(model_dir), max_length=max_length)
    data = load_texts(task_cfg)
    choice = choose_task(model_cfg, task_cfg, resolve_model_source(model_cfg.name), data)
    loaded = load_model(model_cfg.name, classification_head=choice.needs_classification_head)
    task, path = prepare_task(model_cfg, task_cfg, choice, loaded, data, cache)
    return loaded, choice, task, path


def _int8_everywhere(loaded) -> CompressionPlan:
    from slimtune.layout import discover_layout

    return CompressionPlan(quantize={name: QuantSpec("int8") for name in discover_layout(loaded.module).linears})


@pytest.fixture(scope="module")
def classifier_task(tiny_classifier_dir, imbalanced_csv, tmp_path_factory):
    cfg = TaskConfig(data=str(imbalanced_csv), text_column="body", label_column="topic")
    return _prepare(tiny_classifier_dir, cfg, tmp_path_factory.mktemp("cache"))


def test_a_classifier_is_detected_from_its_head_and_imbalance_picks_macro_f1(classifier_task):
    loaded, choice, task, _ = classifier_task
    assert choice.kind == "classifier" and "ForSequenceClassification" in choice.kind_reason
    assert task.output.kind == "logits" and task.label_names == ("money", "sport", "tech")
    assert task.metric == "macro_f1" and "imbalanced" in task.metric_reason
    assert set(task.reference) == {"accuracy", "macro_f1"} and task.reference["macro_f1"] > 0.5
    assert task.train_targets.shape == (task.train_size, 3)  # the teacher's logits: distillation targets


def test_the_exported_classifier_returns_logits_scored_like_torch(classifier_task, tmp_path):
    loaded, _, task, _ = classifier_task
    artifact = build_artifact(loaded.module, CompressionPlan(), tmp_path / "fp32.onnx", output=task.output)
    graph = onnx.load(str(artifact.path)).graph
    assert [o.name for o in graph.output] == ["logits"]
    metrics = {m.name: m.value for m in measure_quality(artifact.path, task)}
    assert metrics == pytest.approx(task.reference)
    int8 = build_artifact(loaded.module, _int8_everywhere(loaded), tmp_path / "int8.onnx", output=task.output)
    assert int8.matmul_kernels.get("MatMulInteger", 0) > 0
    assert {m.name for m in measure_quality(int8.path, task)} == {"accuracy", "macro_f1"}


def test_labels_map_by_name_or_by_class_id(tiny_classifier_dir, imbalanced_csv, tmp_path):
    rows = list(csv.DictReader(imbalanced_csv.open()))
    names = ("money", "sport", "tech")
    numbered = tmp_path / "numbered.csv"
    with numbered.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "topic"])
        writer.writerows([r["body"], names.index(r["topic"])] for r in rows)
    cfg = TaskConfig(data=str(numbered), text_column="body", label_column="topic")
    _, _, task, _ = _prepare(tiny_classifier_dir, cfg, tmp_path / "cache")
    assert task.reference["accuracy"] > 0.5


def test_labels_the_model_does_not_know_are_named(tiny_classifier_dir, imbalanced_csv, tmp_path):
    text = imbalanced_csv.read_text().replace(",tech", ",weather").replace(",money", ",finance")
    (tmp_path / "d.csv").write_text(text)
    cfg = TaskConfig(data=str(tmp_path / "d.csv"), text_column="body", label_column="topic")
    with pytest.raises(DataError, match=r"labels the model does not know: \['finance', 'weather'\].*'money'"):
        _prepare(tiny_classifier_dir, cfg, tmp_path / "cache")


def test_kind_classifier_needs_a_classification_head(tiny_model_dir, tiny_csv, tmp_path):
    cfg = TaskConfig(kind="classifier", data=str(tiny_csv), text_column="body", label_column="topic")
    with pytest.raises(ModelLoadError, match="no sequence-classification head"):
        _prepare(tiny_model_dir, cfg, tmp_path)


def test_the_embedding_head_is_fitted_once_and_cached(tiny_model_dir, tiny_csv, tmp_path):
    cfg = TaskConfig(data=str(tiny_csv), text_column="body", label_column="topic")
    loaded, choice, task, path = _prepare(tiny_model_dir, cfg, tmp_path)
    assert choice.kind == "embedding-head" and task.metric == "accuracy" and "balanced" in task.metric_reason
    assert path.is_file() and task.input_ids.shape == (12, 32) and task.head_weight.shape == (3, 64)
    mtime = path.stat().st_mtime_ns
    _, _, again, again_path = _prepare(tiny_model_dir, cfg, tmp_path)
    assert again_path == path and path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.head_weight, task.head_weight) and again.reference == task.reference
    assert PreparedTask.load(path).label_names == ("money", "sport", "tech")
    artifact = build_artifact(loaded.module, CompressionPlan(), tmp_path / "m.onnx", output=task.output)
    assert {m.name: m.value for m in measure_quality(artifact.path, task)} == pytest.approx(task.reference)


def test_a_metric_the_kind_does_not_measure_is_refused(tiny_model_dir, tiny_csv, tmp_path):
    cfg = TaskConfig(metric="top10_overlap", data=str(tiny_csv), text_column="body", label_column="topic")
    with pytest.raises(DataError, match="not measured by task kind 'embedding-head'"):
        _prepare(tiny_model_dir, cfg, tmp_path)


def test_neighbour_overlap_is_one_for_the_same_embeddings_and_low_for_unrelated_ones():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 16))
    assert neighbour_overlap(reference, reference * 3.0) == 1.0  # cosine: scale does not matter
    assert neighbour_overlap(reference, rng.normal(size=(60, 16))) < 0.4
    assert 0.5 < neighbour_overlap(reference, reference + 0.3 * rng.normal(size=(60, 16))) < 1.0


@pytest.fixture(scope="module")
def builtin_text_file(tmp_path_factory) -> Path:
    """A plain text file: the first line of 80 built-in articles, one per line."""
    data = load_texts(TaskConfig())
    lines = [text.splitlines()[0] for text in data.texts[::27][:80]]
    path = tmp_path_factory.mktemp("texts") / "headlines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_fidelity_on_the_default_model_with_a_plain_text_file(builtin_text_file, tmp_path):
    from slimtune.config import BUILTIN_MODEL

    cfg = TaskConfig(data=str(builtin_text_file), test_fraction=0.5)
    loaded, choice, task, _ = _prepare(Path(BUILTIN_MODEL), cfg, tmp_path, max_length=64)
    assert choice.kind == "embedding-fidelity" and "no label column" in choice.kind_reason
    assert task.output.pooling == "mean" and "sentence-transformers" in choice.output_reason
    assert task.metric == "top10_overlap" and task.labels is None and len(task.input_ids) == 40
    fp32 = build_artifact(loaded.module, CompressionPlan(), tmp_path / "fp32.onnx", output=task.output)
    exact = {m.name: m.value for m in measure_quality(fp32.path, task)}
    assert exact["embedding_cosine"] > 0.9999 and exact["top10_overlap"] > 0.99
    int8 = build_artifact(loaded.module, _int8_everywhere(loaded), tmp_path / "int8.onnx", output=task.output)
    close = {m.name: m.value for m in measure_quality(int8.path, task)}
    assert 0.95 < close["embedding_cosine"] < exact["embedding_cosine"]
    assert 0.6 < close["top10_overlap"] <= exact["top10_overlap"]


def _with_pooling_config(model_dir: Path, folder: Path, modes: dict[str, bool]) -> Path:
    shutil.copytree(model_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    return folder


def test_pooling_comes_from_the_sentence_transformers_config_unless_overridden(tiny_model_dir, tiny_csv, tmp_path):
    from slimtune.tasks import choose_output

    cls_model = _with_pooling_config(tiny_model_dir, tmp_path / "cls", {"pooling_mode_cls_token": True,
                                                                         "pooling_mode_mean_tokens": False})
    assert choose_output("embedding-head", ModelConfig(name=str(cls_model)), str(cls_model))[0].pooling == "cls"
    assert choose_output("embedding-head", ModelConfig(name=str(cls_model), pooling="max"),
                         str(cls_model))[0].pooling == "max"
    assert choose_output("embedding-head", ModelConfig(name=str(tiny_model_dir)), str(tiny_model_dir))[0].pooling == "mean"
    odd = _with_pooling_config(tiny_model_dir, tmp_path / "odd", {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ModelLoadError, match="set model.pooling"):
        choose_output("embedding-head", ModelConfig(name=str(odd)), str(odd))


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_every_pooling_exports_to_what_torch_computes(bert, token_batch, tmp_path, pooling):
    import onnxruntime as ort
    import torch

    from slimtune.model import OutputSpec, PooledEmbedding

    ids, mask = token_batch
    artifact = build_artifact(bert, CompressionPlan(), tmp_path / "m.onnx", output=OutputSpec("embedding", pooling))
    got = ort.InferenceSession(str(artifact.path)).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = PooledEmbedding(bert, pooling)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    if pooling == "max":  # padding never wins the maximum: the padded text equals itself cut to its real tokens
        with torch.no_grad():
            short = PooledEmbedding(bert, pooling)(torch.from_numpy(ids[1:2, :20]), torch.from_numpy(mask[1:2, :20]))
        np.testing.assert_allclose(want[1], short.numpy()[0], atol=1e-4)


def test_a_regression_head_is_not_scored_as_a_classifier(tiny_classifier_dir, tiny_csv, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path / "regressor"
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, problem_type="regression")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = TaskConfig(data=str(tiny_csv), text_column="body", label_column="topic")
    with pytest.raises(ModelLoadError, match="not a single-label classifier"):
        _prepare(folder, cfg, tmp_path / "cache")


def test_a_tokenizer_without_padding_pads_with_its_end_token(tiny_model_dir, bert):
    from transformers import AutoTokenizer

    from slimtune.model import ensure_padding

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    bert.config.pad_token_id = None
    ensure_padding(tokenizer, bert)
    assert tokenizer.pad_token == "[SEP]" and bert.config.pad_token_id == tokenizer.sep_token_id
