"""CLI behaviour: bad input gives one line on stderr and exit code 2; commands run under CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from runtime.cli import app

runner = CliRunner()


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    for f in fragments:
        assert f in message


def test_missing_model_path():
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", "/no/such/model"]), "does not exist")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert_clean_error(runner.invoke(app, ["generate", "-p", "hi", "--model", str(tmp_path)]), "gpt2", "supported: llama")


def test_empty_prompt(tiny_llama_dir):
    assert_clean_error(runner.invoke(app, ["generate", "-p", "  ", "--model", str(tiny_llama_dir)]), "empty prompt")


def test_generate_json_on_default_model(default_model_dir):
    result = runner.invoke(app, ["generate", "-p", "Name a colour.", "-n", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["text"] and report["new_tokens"] >= 1 and report["decode_tokens_per_s"] > 0
