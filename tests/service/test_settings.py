"""Settings: environment parsing and refusal of unsafe or contradictory values."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from service.settings import Settings, default_model_dir


def test_defaults_serve_the_builtin_model(monkeypatch):
    settings = Settings()
    assert settings.models == {"default": default_model_dir()}
    assert (default_model_dir() / "config.json").is_file()
    assert settings.host == "127.0.0.1" and settings.max_timesteps_per_request == 100_000
    assert settings.max_body_bytes == 16 * 1024 * 1024


def test_a_model_directory_this_user_cannot_enter_is_refused_by_name(tmp_path, monkeypatch):
    from pathlib import Path

    def no_entry(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_file", no_entry)  # root may enter any mode-0700 directory
    with pytest.raises(ValueError, match=r"cannot be read by this user \(Permission denied\)"):
        Settings(models={"m": tmp_path})


def test_a_checkpoint_file_this_user_cannot_read_is_refused_by_name(tiny_dir, monkeypatch):
    import os

    readable = os.access

    def no_read(path, mode, *args, **kwargs):
        return not str(path).endswith("model.safetensors") and readable(path, mode)

    monkeypatch.setattr(os, "access", no_read)  # root may read any mode-0600 file
    match = r"cannot be read by this user \(Permission denied: model.safetensors\)"
    with pytest.raises(ValueError, match=match):
        Settings(models={"m": tiny_dir})


def test_builtin_names_the_shipped_model_beside_your_own(tiny_dir):
    settings = Settings(models=["default=builtin", f"mine={tiny_dir}"])
    assert settings.models == {"default": default_model_dir(), "mine": tiny_dir}


def test_environment_with_prefix(monkeypatch, tiny_dir, tokens_dir):
    monkeypatch.setenv("TCNSERVE_MODELS", f"a={tiny_dir},b={tokens_dir}")
    monkeypatch.setenv("TCNSERVE_API_KEYS", "k" * 16 + ",m" * 1 + "x" * 15)
    monkeypatch.setenv("TCNSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TCNSERVE_DEVICE", "cpu")
    settings = Settings()
    assert set(settings.models) == {"a", "b"} and settings.max_batch_size == 7
    assert settings.api_key_values() == ["k" * 16, "m" + "x" * 15]
    assert "kkkk" not in repr(settings)
    monkeypatch.setenv("TCNSERVE_MODELS", f'{{"only": "{tiny_dir}"}}')
    monkeypatch.setenv("TCNSERVE_API_KEYS", '["' + "z" * 20 + '"]')
    settings = Settings()
    assert list(settings.models) == ["only"] and settings.api_key_values() == ["z" * 20]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_batch_delay_ms": -1}, "max_batch_delay_ms"),
        ({"api_keys": ["short"]}, "at least 16 characters"),
        ({"api_keys": ["x" * 16, "x" * 16]}, "duplicate"),
        ({"models": {"m": "/does/not/exist"}}, "no config.json"),
        ({"models": {"bad name": "."}}, "invalid model name"),
        ({"models": {}}, "at least one model"),
        ({"session_ttl_s": 100, "max_session_ttl_s": 10}, "exceeds max_session_ttl_s"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"device": "tpu"}, "device"),
        ({"max_timesteps_per_request": 0}, "max_timesteps_per_request"),
        ({"unknown_setting": 1}, "unknown_setting"),
    ],
)
def test_unsafe_settings_refuse_to_start(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        Settings(**overrides)


def test_api_keys_come_from_a_mounted_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-12\n" + "a" * 16 + "," + "b" * 16 + "\n\n" + "c" * 16 + "\n")
    monkeypatch.setenv("TCNSERVE_API_KEYS_FILE", str(keys))
    settings = Settings()
    assert settings.api_key_values() == ["a" * 16, "b" * 16, "c" * 16]
    assert "aaaa" not in repr(settings)
    # The edge and engine processes get the keys, not the file again.
    revealed = settings.secrets_revealed()
    assert revealed["api_keys_file"] is None
    assert Settings(**revealed).api_key_values() == settings.api_key_values()
    monkeypatch.setenv("TCNSERVE_API_KEYS", "d" * 16)
    with pytest.raises(ValidationError, match="not both"):
        Settings()
    monkeypatch.delenv("TCNSERVE_API_KEYS")
    keys.write_text("short\n")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
    keys.write_text("# nothing yet\n")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()
    keys.unlink()
    with pytest.raises(ValidationError, match="cannot be read: No such file"):
        Settings()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_without_a_gpu_refuses():
    with pytest.raises(ValidationError, match="no CUDA GPU"):
        Settings(device="cuda")
    with pytest.raises(ValidationError, match="float16 needs device cuda"):
        Settings(dtype="float16")
    assert Settings(device="auto").resolved_device() == "cpu"


def test_public_bind_without_keys_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="service.settings"):
        Settings(host="0.0.0.0")
    assert "no API keys" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.settings"):
        Settings(host="0.0.0.0", api_keys=["q" * 16])
    assert "no API keys" not in caplog.text


def test_cuda_graphs_need_a_cuda_device(make_settings):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="cuda_graphs needs a CUDA device"):
        make_settings(cuda_graphs=True, device="cpu")


def test_usable_cores_honour_a_cgroup_cpu_quota(monkeypatch, tmp_path):
    import os
    from pathlib import Path as RealPath

    import service.settings as settings_module

    quota = tmp_path / "cpu.max"
    real = RealPath

    def path(p: str = "", *rest):  # only the cgroup file is redirected
        return quota if str(p) == "/sys/fs/cgroup/cpu.max" else real(p, *rest)

    monkeypatch.setattr(settings_module, "Path", path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    quota.write_text("150000 100000\n")  # 1.5 CPUs: rounded up
    assert settings_module.usable_cores() == 2
    quota.write_text("max 100000\n")
    assert settings_module.usable_cores() == 64
    assert settings_module.Settings(workers=None).resolved_workers() == 8
    assert settings_module.Settings(workers=0).resolved_workers() == 0
