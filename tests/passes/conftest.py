"""Fixtures shared by the pass tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest


@pytest.fixture(scope="session")
def train_digits(tmp_path_factory) -> Callable:
    """``train(build, name, epochs=, lr=, cosine=)``: a network ``build(torch, nn, functional)``
    trained with Adam on scikit-learn's digits (seed 0, one thread, batches of 64, images scaled
    to about zero mean), exported to ONNX (opset 17, input ``x``, output ``y``); returns
    ``(path, test images, test labels, PyTorch test logits)``."""

    def train(build: Callable, name: str, *, epochs: int, lr: float, cosine: bool = False):
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from torch import nn
        from torch.nn import functional

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny network: one thread is faster, and the cores are shared
        try:
            torch.manual_seed(0)
            digits = load_digits()
            images = ((digits.images / 16.0 - 0.3) / 0.4).astype(np.float32)[:, None]
            train_x, test_x, train_y, test_y = train_test_split(
                images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
            )
            network = build(torch, nn, functional)
            optimizer = torch.optim.Adam(network.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
            inputs, labels = torch.from_numpy(train_x), torch.from_numpy(train_y)
            for _ in range(epochs):
                network.train()
                order = torch.randperm(len(inputs))
                for start in range(0, len(inputs), 64):
                    batch = order[start : start + 64]
                    loss = functional.cross_entropy(network(inputs[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
            network.eval()
            with torch.no_grad():
                logits = network(torch.from_numpy(test_x)).numpy()
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    network, (torch.from_numpy(test_x),), str(path),
                    dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        return path, test_x, test_y, logits

    return train
