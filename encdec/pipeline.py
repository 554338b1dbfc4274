"""The Python API for cascades of runs (`encdec pipeline ASR_RUN MT_RUN AUDIO...` is
``encdec.commands.pipeline``):

    p = Pipeline.from_runs(["runs/asr-small", "runs/bible-en-es"])
    p.run(["a.wav", (samples, 44100)])                        # final texts, one per input
    p.run(["a.wav"], stage_overrides=[{"beam_size": 8, "ctc_weight": 0.3}, {"beam_size": 5}])
    p.run_nbest(["a.wav"], asr_nbest=4, rescore=True)[0][0].transcript

The first stage is a speech run (audio in, text out); every later stage is a text run that
takes the text of the stage before. Inputs are what ``Transcriber`` takes: file paths or
(samples, sample_rate) pairs.

Scores. Each stage reports a score for its output as its search computes it (beam search: the
log-probability divided by length ** decode.length_penalty; greedy and CTC: the
log-probability). An output's ``score`` is the sum of the scores of the stage outputs that led
to it, the stages weighted equally. Without rescoring only the best transcript is translated,
so every output shares its ASR score and the sum ranks them as the last stage does. With
``rescore=True`` each of the ``asr_nbest`` transcripts is translated and the outputs of all of
them are ranked by that sum (an output reached from two transcripts is kept once, with its best
sum): a transcript the recognizer found slightly less likely can win when the translation
model finds it much easier to translate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encdec.config import ConfigError
from encdec.decoding.texts import Translation
from encdec.transcribe import Transcriber
from encdec.translate import Translator


@dataclass
class Output:
    """A final output and the stage outputs it came through."""

    text: str
    score: float  # the sum of the stages' scores (see the module docstring)
    stages: list[Translation]  # each stage's output in turn; stages[-1] is this output

    @property
    def transcript(self) -> str:
        """What the first stage (the recognizer) heard."""
        return self.stages[0].text


def check_stage(k: int, stage: Translator, name: str) -> None:
    """ConfigError naming the run unless stage ``k`` (0 first) takes what it will be given:
    audio for the first stage, the text of the stage before for the others."""
    if k == 0 and not stage.assets.speech:
        raise ConfigError(f"{name} is a text run, so it cannot be the first stage of a "
                          "pipeline: the first stage takes the audio; give a speech run first "
                          "(encdec pipeline ASR_RUN MT_RUN AUDIO...)")
    if k > 0 and stage.assets.speech:
        raise ConfigError(f"{name} is a speech run, so it cannot be stage {k + 1} of a "
                          f"pipeline: stage {k + 1} takes the text of stage {k}; a speech run "
                          "can only be the first stage")


def _check_count(names: list[str]) -> None:
    if len(names) < 2:
        raise ConfigError(f"a pipeline needs at least two runs (a speech run, then text runs); "
                          f"got {len(names)}")


class Pipeline:
    """A speech run followed by text runs, each decoding what the one before wrote."""

    def __init__(self, stages: list[Translator], names: list[str]):
        _check_count(names)
        for k, (stage, name) in enumerate(zip(stages, names)):
            check_stage(k, stage, name)
        first = stages[0]
        if not isinstance(first, Transcriber):
            first = Transcriber(first.model, first.assets, first.cfg, first.device,
                                first.checkpoint_dir)
        self.stages = [first, *stages[1:]]
        self.names = names

    @classmethod
    def from_runs(cls, run_dirs: list[str | Path], checkpoint_name: str = "best",
                  device: str = "cpu") -> Pipeline:
        names = [str(r) for r in run_dirs]
        _check_count(names)
        stages = []
        for k, run in enumerate(run_dirs):  # checked as they load: a wrong order fails at once
            stages.append(Translator.from_run(run, checkpoint_name, device))
            check_stage(k, stages[-1], names[k])
        return cls(stages, names)

    @property
    def transcriber(self) -> Transcriber:
        return self.stages[0]

    def stage_settings(self, nbest: int = 1, asr_nbest: int = 1,
                       stage_overrides: list[dict] | None = None) -> list[dict]:
        """Each stage's decoding overrides, validated now (ConfigError naming the stage's run),
        so bad settings fail before any audio is decoded."""
        overrides = stage_overrides or [{} for _ in self.stages]
        if len(overrides) != len(self.stages):
            raise ConfigError(f"stage_overrides has {len(overrides)} entries for "
                              f"{len(self.stages)} stages; give one dict per stage")
        settings = []
        for k, (stage, given) in enumerate(zip(self.stages, overrides)):
            if "nbest" in given:
                raise ConfigError(f"stage_overrides[{k}]: nbest is set by nbest= (last stage) "
                                  "and asr_nbest= (first stage)")
            n = asr_nbest if k == 0 else nbest if k == len(self.stages) - 1 else 1
            values = {**given, "nbest": n}
            try:
                stage.decode_config(**values)
            except ConfigError as err:
                raise ConfigError(f"stage {k + 1} ({self.names[k]}): {err}") from None
            settings.append(values)
        return settings

    def run_nbest(self, inputs: list, nbest: int = 1, rescore: bool = False, asr_nbest: int = 1,
                  stage_overrides: list[dict] | None = None, warn=None) -> list[list[Output]]:
        """Per input its ``nbest`` final outputs, best first, each with the stage outputs it
        came through (``output.transcript`` is the recognizer's). ``asr_nbest``: transcripts
        per input from the first stage; with ``rescore`` all of them are translated and the
        outputs ranked by the summed score, else only the best is translated.
        ``stage_overrides``: decoding settings per stage (``Translator.decode_config`` names),
        e.g. ``[{"method": "beam", "beam_size": 8, "ctc_weight": 0.3}, {"beam_size": 5}]``.
        ``warn(index, message)`` hears about long audio cut into segments."""
        settings = self.stage_settings(nbest, asr_nbest, stage_overrides)
        transcripts = self.transcriber.transcribe_nbest(inputs, warn=warn, **settings[0])
        # paths[i]: the partial paths of input i, each a list of stage outputs so far
        paths = [[[h] for h in (nb if rescore else nb[:1])] for nb in transcripts]
        for k, stage in enumerate(self.stages[1:], 1):
            flat = [path for per_input in paths for path in per_input]
            results = iter(stage.translate_nbest([path[-1].text for path in flat],
                                                 **settings[k]))
            paths = [[path + [t] for path in per_input for t in next(results)]
                     for per_input in paths]
        out = []
        for per_input in paths:
            outputs = [Output(path[-1].text, sum(t.score for t in path), path)
                       for path in per_input]
            if rescore:
                outputs.sort(key=lambda o: -o.score)  # stable: ties keep the recognizer's order
                first = {}
                for o in outputs:  # an output reached from two transcripts: its best sum
                    first.setdefault(o.text, o)
                outputs = list(first.values())
            out.append(outputs[:nbest])
        return out

    def run(self, inputs: list, nbest: int = 1, rescore: bool = False,
            stage_overrides: list[dict] | None = None, **kwargs) -> list[str]:
        """The best final output of each input, in input order."""
        return [nb[0].text if nb else "" for nb in
                self.run_nbest(inputs, nbest=nbest, rescore=rescore,
                               stage_overrides=stage_overrides, **kwargs)]
