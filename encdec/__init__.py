"""encdec: a sequence-to-sequence toolkit built around the Transformer encoder-decoder."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import encdec` stays cheap for the CLI's --help.
    if name == "Translator":
        from encdec.translate import Translator

        return Translator
    if name == "Transcriber":
        from encdec.transcribe import Transcriber

        return Transcriber
    raise AttributeError(name)
