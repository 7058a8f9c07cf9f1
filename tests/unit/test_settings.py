import pytest

from citygrid.settings import Settings, SettingsError


def test_defaults():
    s = Settings.from_env({})
    assert (s.mqtt.host, s.mqtt.port, s.influx_url, s.influx_db) == (
        "127.0.0.1", 1883, "", "citygrid")


def test_environment_and_flags():
    s = Settings.from_env({"CITYGRID_MQTT_URL": "mqtts://ingest:s%40cret@broker:8884",
                           "CITYGRID_INFLUX_DB": "city"}, influx_db=None, data_dir="/tmp/x")
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.tls) == ("broker", 8884, True)
    assert (s.mqtt.username, s.mqtt.password) == ("ingest", "s@cret")
    assert "s@cret" not in str(s.mqtt)
    assert s.influx_db == "city" and s.data_dir == "/tmp/x"


@pytest.mark.parametrize("env, variable", [
    ({"CITYGRID_MQTT_URL": "http://broker"}, "CITYGRID_MQTT_URL"),
    ({"CITYGRID_MQTT_URL": "mqtt://:1883"}, "CITYGRID_MQTT_URL"),
    ({"CITYGRID_MQTT_URL": "mqtt://h:99999"}, "CITYGRID_MQTT_URL"),
    ({"CITYGRID_INFLUX_URL": "influx:8086"}, "CITYGRID_INFLUX_URL"),
    ({"CITYGRID_INFLUX_USER": "admin"}, "CITYGRID_INFLUX_PASSWORD"),
    ({"CITYGRID_LEDGER_ANCHOR_EVERY": "0"}, "CITYGRID_LEDGER_ANCHOR_EVERY"),
    ({"CITYGRID_LEDGER_ANCHOR_EVERY": "ten"}, "CITYGRID_LEDGER_ANCHOR_EVERY"),
    ({"CITYGRID_LEDGER_ANCHOR_EVERY": "2.5"}, "CITYGRID_LEDGER_ANCHOR_EVERY"),
    ({"CITYGRID_PAYMENT_CALLBACK_URL": "gateway:8000/cb"}, "CITYGRID_PAYMENT_CALLBACK_URL"),
])
def test_errors_name_the_variable(env, variable):
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env)
    assert e.value.variable == variable
    assert str(e.value).startswith(variable)


def test_the_ledger_anchor_interval_is_a_number_of_entries():
    assert Settings.from_env({}).ledger_anchor_every == 100
    assert Settings.from_env({"CITYGRID_LEDGER_ANCHOR_EVERY": " 25 "}).ledger_anchor_every == 25
    assert Settings(ledger_anchor_every=1).ledger_anchor_every == 1


def test_the_payment_callback_url_is_set_or_derived_from_the_status_url():
    assert Settings.from_env({}).payment_callback == ""
    derived = Settings.from_env({"CITYGRID_STATUS_URL": "https://city.example/"})
    assert derived.payment_callback == ("https://city.example/api/v1/billing/payments/"
                                        "callback")
    own = Settings.from_env({"CITYGRID_STATUS_URL": "https://city.example",
                             "CITYGRID_PAYMENT_CALLBACK_URL": "https://pay.example/cb"})
    assert own.payment_callback == "https://pay.example/cb"


def test_as_env_round_trips():
    s = Settings(influx_url="http://127.0.0.1:8086", data_dir="/d", ledger_anchor_every=7,
                 payment_callback_url="http://gw:8000/api/v1/billing/payments/callback")
    assert Settings.from_env(s.as_env()) == s


def test_a_broker_cluster_is_several_nodes_with_one_tls_and_one_account():
    from citygrid.settings import MqttUrl

    url = MqttUrl.parse("mqtts://ingest:p%40ss@h1:8883,h2,[::1]:9883/")
    assert url.nodes == (("h1", 8883), ("h2", 8883), ("::1", 9883))
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "h1", 8883, True, "ingest", "p@ss")
    second = url.node(1)
    assert (second.host, second.port, second.tls, second.username) == ("h2", 8883, True,
                                                                        "ingest")
    assert str(second) == "mqtts://ingest:***@h2:8883"
    assert str(url) == "mqtts://ingest:***@h1:8883,h2:8883,[::1]:9883"
    assert MqttUrl.parse("mqtt://127.0.0.1:1883").nodes == (("127.0.0.1", 1883),)


@pytest.mark.parametrize("url, says", [
    ("mqtt://h1:1883,h2:x", "node 2 of 'mqtt://h1:1883,h2:x' has an invalid port"),
    ("mqtt://h1,,h3", "node 2 of 'mqtt://h1,,h3' has no host"),
    ("mqtt://h1:1883,h1:1883", "h1:1883 is listed twice"),
    ("mqtt://h1:99999", "'mqtt://h1:99999' has an invalid port"),
])
def test_a_bad_node_is_named(url, says):
    with pytest.raises(SettingsError, match="CITYGRID_MQTT_URL") as e:
        Settings(mqtt_url=url)
    assert says in str(e.value)
