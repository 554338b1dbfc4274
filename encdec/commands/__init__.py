"""What each `encdec VERB` does at the terminal (reading files or stdin, progress bars, output
formatting, exit status), on the Python API of the module of the same name under ``encdec``.
``encdec.cli`` parses the arguments and calls ``run`` here."""
