"""The shipped folder as an MLflow model: texts in, labels and probabilities (or embeddings) out.

The class is pickled by value when logged, so ``mlflow.pyfunc.load_model`` needs onnxruntime,
tokenizers, numpy and pandas, not slimtune.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc


class ShippedModel(mlflow.pyfunc.PythonModel):
    """Predicts from a DataFrame with a ``text`` column (or a list of texts): for the classification
    kinds a ``label`` column and one ``p_<label>`` probability column per class; otherwise one
    ``e<i>`` column per embedding dimension."""

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

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        texts = list(model_input["text"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
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
