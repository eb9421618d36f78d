"""``make demo``: the recommended method's proponents and opponents, with what they mean."""

import re

from datatrace import demo


def test_demo_shows_the_recommended_method_and_explains_the_numbers(capsys):
    demo.main(["--queries", "2", "--k", "3"])
    out = capsys.readouterr().out
    assert "EK-FAC influence (recommended" in out and "TRAK" in out
    assert "proponents (> 0) raised it" in out
    # each method explains 2 queries with 3 proponents and 3 opponents
    assert out.count("proponents: #") == 4 and out.count("opponents : #") == 4
    # EK-FAC's top proponent of each query is an image of the query's own digit
    ekfac = out[out.index("EK-FAC influence (recommended") : out.index("TRAK (proj_dim")]
    truths = re.findall(r"query \d+: true digit (\d)", ekfac)
    tops = re.findall(r"proponents: #\d+ \(digit (\d)", ekfac)
    assert len(truths) == 2 and tops == truths
