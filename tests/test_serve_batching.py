"""The batcher (`encdec/serve/batching.py`): equal settings share a batch, oldest first; a full
queue refuses; a failing input fails only its own request."""

import threading
import time

import pytest

from encdec.config import ServeConfig
from encdec.serve import Batcher, create_app
from encdec.translate import Translator
from serving import call, error_of, translate_request


class RecordingTranslator:
    """Stands in for a Translator: records the batches and echoes the inputs."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()

    def translate_nbest(self, texts, need_attention=False, warn=None, **settings):
        self.gate.wait(10)
        self.batches.append((list(texts), settings.get("beam_size")))
        from encdec.decoding.texts import Translation
        return [[Translation(t.upper(), 0.0, list(t), list(t.upper()))] for t in texts]


def test_batcher_groups_equal_settings_oldest_first():
    tr = RecordingTranslator()
    batcher = Batcher(tr, ServeConfig(max_batch_size=4, max_wait_ms=0))
    jobs = [batcher.submit(["first"], {"beam_size": 1, "return_attention": False}, None)]
    time.sleep(0.2)  # the model thread has taken the first job and waits on the gate
    for texts, beam in ((["a", "b"], 5), (["c"], 1), (["d"], 5), (["e", "f"], 5), (["g"], 1)):
        jobs.append(batcher.submit(texts, {"beam_size": beam, "return_attention": False}, None))
    assert batcher.queued_inputs == 7
    tr.gate.set()
    for job in jobs:
        assert job.done.wait(10)
    batcher.close()
    assert tr.batches == [(["first"], 1), (["a", "b", "d"], 5), (["c", "g"], 1), (["e", "f"], 5)]
    assert [r[0].text for r in jobs[4].result[0]] == ["E", "F"]


def test_batcher_refuses_when_the_queue_is_full():
    from encdec.serve import RequestError
    tr = RecordingTranslator()
    batcher = Batcher(tr, ServeConfig(max_queue=3, max_wait_ms=0))
    batcher.submit(["x"], {"return_attention": False}, None)
    time.sleep(0.2)
    batcher.submit(["a", "b", "c"], {"return_attention": False}, None)
    with pytest.raises(RequestError) as err:
        batcher.submit(["d"], {"return_attention": False}, None)
    assert err.value.status == 503
    tr.gate.set()
    batcher.close()


@pytest.fixture(scope="module")
def translator(tiny_run):
    return Translator.from_run(tiny_run)


def test_a_failing_input_fails_only_its_own_request(translator, monkeypatch):
    words = ["abc", "hgfe", "a"]
    expected = translator.translate(words)
    real, batches = translator.translate_nbest, []

    def fails_on_boom(texts, **kw):
        batches.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("the model choked")
        return real(texts, **kw)

    monkeypatch.setattr(translator, "translate_nbest", fails_on_boom)
    app = create_app(translator, ServeConfig(max_wait_ms=500))
    first, bad, last = call(app, translate_request(words[:1]), translate_request(["ab", "boom"]),
                            translate_request(words[1:]))
    assert sorted(batches[0]) == sorted(words + ["ab", "boom"])  # the three shared a batch
    assert first.status_code == 200 and first.json()["outputs"] == expected[:1]
    assert last.status_code == 200 and last.json()["outputs"] == expected[1:]
    assert error_of(bad, 500) == "inputs[1]"
    assert "RuntimeError" in bad.json()["error"]["message"]
    again, = call(app, translate_request(words))
    assert again.json()["outputs"] == expected
