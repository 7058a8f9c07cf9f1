import pytest

from citygrid.store.base import Point
from citygrid.store.lineproto import encode


def test_tags_sorted_and_types():
    line = encode(Point("streetlight", {"district": "norrebro", "device_id": "sl-1"},
                        {"brightness_pct": 40.0, "seq": 3, "motion": True, "fault": "x"},
                        1790000000000))
    assert line == ('streetlight,device_id=sl-1,district=norrebro '
                    'brightness_pct=40.0,seq=3i,motion=true,fault="x" 1790000000000')


def test_escaping():
    line = encode(Point("my meas,x", {"tag key": "a,b=c d"},
                        {"field=1": 'say "hi" \\ there'}, 1))
    assert line == r'my\ meas\,x,tag\ key=a\,b\=c\ d field\=1="say \"hi\" \\ there" 1'


def test_empty_tag_values_are_left_out():
    assert encode(Point("m", {"a": ""}, {"v": 1.0}, 5)) == "m v=1.0 5"


def test_bool_is_not_an_integer():
    assert encode(Point("m", {}, {"a": False, "b": 0}, 5)) == "m a=false,b=0i 5"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cannot_be_encoded(bad):
    with pytest.raises(ValueError):
        encode(Point("m", {}, {"v": bad}, 1))


def test_one_shape_with_other_value_types():
    """Encoders are made per field names and value types: a field that was a float and comes
    as an int (or a bad value after good ones) is written by its own rule."""
    assert encode(Point("m", {}, {"v": 1.5, "w": True}, 1)) == "m v=1.5,w=true 1"
    assert encode(Point("m", {}, {"v": 2, "w": "x"}, 2)) == 'm v=2i,w="x" 2'
    with pytest.raises(ValueError):
        encode(Point("m", {}, {"v": float("-inf"), "w": True}, 3))
    with pytest.raises(TypeError):
        encode(Point("m", {}, {"v": [1], "w": True}, 4))
