"""The shipped folder as an MLflow model: texts in, labels and probabilities (embeddings, or generated text) out.

The class is pickled by value when logged, so ``mlflow.pyfunc.load_model`` needs onnxruntime,
tokenizers, numpy and pandas, not slimtune.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc


class ShippedModel(mlflow.pyfunc.PythonModel):
    """Predicts from a DataFrame with a ``text`` column (or a list of texts): for the classification
    kinds a ``label`` column and one ``p_<label>`` probability column per class; for a causal LM a
    ``generated`` column, each text's greedy continuation (``params={"max_new_tokens": 32}``);
    otherwise one ``e<i>`` column per embedding dimension."""

    def load_context(self, context) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(context.artifacts["shipped"])
        metrics = json.loads((folder / "metrics.json").read_text())
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokens = metrics["tokenizer"]
        self.tokenizer.enable_truncation(tokens["max_length"])
        self.tokenizer.enable_padding(pad_id=tokens["pad_id"], pad_token=tokens["pad_token"])
        labels = folder / "labels.json"
        self.labels = json.loads(labels.read_text()) if labels.is_file() else None
        self.generates = metrics.get("task_kind") == "causal-lm"
        if self.generates:
            self.tokenizer.no_padding()
            self.tokenizer.no_truncation()

    def generate(self, text: str, new_tokens: int) -> str:
        """Greedy continuation of ``text`` by ``new_tokens`` tokens through the model's KV cache."""
        import numpy as np

        names = [o.name for o in self.session.get_outputs()]
        ids = np.array([self.tokenizer.encode(text).ids], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                      for i in self.session.get_inputs() if i.name.startswith("past_key_values.")})
        generated: list[int] = []
        for _ in range(new_tokens):
            logits, *cache = self.session.run(names, feeds)
            generated.append(int(logits[0, -1].argmax()))
            feeds = {"input_ids": np.array([[generated[-1]]], np.int64),
                     "attention_mask": np.ones((1, feeds["attention_mask"].shape[1] + 1), np.int64),
                     **{n.replace("present.", "past_key_values.", 1): c for n, c in zip(names[1:], cache, strict=True)}}
        return self.tokenizer.decode(generated)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        texts = list(model_input["text"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        if self.generates:
            new_tokens = int((params or {}).get("max_new_tokens", 32))
            return pd.DataFrame({"generated": [self.generate(str(t), new_tokens) for t in texts]})
        encoded = self.tokenizer.encode_batch([str(t) for t in texts])
        feeds = {"input_ids": np.array([e.ids for e in encoded], np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}
        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds), strict=True))
        if self.labels is None:
            embedding = outputs["sentence_embedding"]
            return pd.DataFrame(embedding, columns=[f"e{i}" for i in range(embedding.shape[1])])
        probabilities = outputs["probabilities"]
        frame = pd.DataFrame(probabilities, columns=[f"p_{label}" for label in self.labels])
        frame.insert(0, "label", [self.labels[i] for i in probabilities.argmax(axis=1)])
        return frame
