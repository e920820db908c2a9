from moegen.benchmarks import available, format_table, load


def test_format_table_nests_dicts_and_tabulates_lists():
    lines = format_table({"a": 1.23456789, "nested": {"b": 2}, "rows": [{"x": 1, "name": "p"}, {"x": 10, "name": "q"}]})
    assert lines == ["a       1.23457", "nested:", "  b  2", "rows:", "   x  name", "   1     p", "  10     q"]


def test_every_benchmark_has_a_description_and_runner():
    for name in available():
        module = load(name)
        assert module.DESCRIPTION and callable(module.run) and callable(module.add_arguments)
