"""The built-in model, served with no settings: trained, and as good over HTTP as it says."""

from __future__ import annotations

import numpy as np
import torch

from model.tasks import adding_problem
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import serving

FRESH_SEED = 7_777  # neither the training, validation nor test seed of the shipped model


def test_default_model_answers_fresh_adding_problems_with_its_stated_mse():
    with serving(create_app(Settings())) as client:
        info = client.get("/v1/models/default").json()
        assert info["trained"] is True and info["task"] == "adding"
        stated = info["evaluation"]["value"]
        assert info["evaluation"]["metric"] == "mse" and info["evaluation"]["seq_len"] == 600
        assert info["evaluation"]["paper_value"] == 5.8e-5

        x, target = adding_problem(64, 600, torch.Generator().manual_seed(FRESH_SEED))
        sequences = x.transpose(1, 2).tolist()  # (B, 2, T) -> B sequences of T rows
        r = client.post("/v1/models/default/predict", json={"inputs": sequences, "outputs": "last"})
        assert r.status_code == 200, r.text
        predicted = np.array([seq[0][0] for seq in r.json()["outputs"]])
        mse = float(np.mean((predicted - target.numpy()) ** 2))
        # 64 sequences are a noisy estimate of the 2,000-sequence test MSE: allow 3x, and a
        # floor far below the 0.167 of a model that always answers the mean.
        assert mse < 3 * stated + 2e-4, (mse, stated)


def test_default_model_beats_the_paper_through_predict_on_fresh_seeds():
    x, target = adding_problem(160, 600, torch.Generator().manual_seed(FRESH_SEED + 1))
    with serving(create_app(Settings())) as client:
        r = client.post(
            "/v1/models/default/predict",
            json={"inputs": x.transpose(1, 2).tolist(), "outputs": "last"},
        )
    assert r.status_code == 200, r.text
    predicted = np.array([seq[0][0] for seq in r.json()["outputs"]])
    assert float(np.mean((predicted - target.numpy()) ** 2)) < 5.8e-5
