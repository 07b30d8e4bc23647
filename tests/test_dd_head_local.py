"""A DD folder whose continuous head file is missing is reported from the local folder, with no Hub call."""

import pytest


def test_missing_head_in_a_local_folder_never_asks_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline

    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    pipe = DistilledDecodingPipeline.__new__(DistilledDecodingPipeline)
    with pytest.raises(FileNotFoundError, match="continuous_head"):
        pipe._load_head(tmp_path)
    assert calls == []  # a local folder is never looked up on the Hub
