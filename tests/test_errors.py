from slimtune.errors import first_line


def test_first_line_quotes_the_first_line_cut_to_the_limit_else_the_type():
    assert first_line(ValueError("bad value\nTraceback follows")) == "bad value"
    assert first_line(OSError("x" * 300)) == "x" * 160
    assert first_line(OSError("x" * 300), limit=200) == "x" * 200
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(KeyError("")) == "''"  # str() of a KeyError is its repr: not empty
