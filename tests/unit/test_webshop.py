"""WebShop-style environment (clean-room; not comparable to published WebShop scores): page flow, reward, oracle."""

import json

import pytest

from verl_hindsight.environment.protocol import make_env
from verl_hindsight.envs.webshop import BM25Index, WebShopEnv, default_catalog_path, parse_action, webshop_reward
from verl_hindsight.envs.webshop_catalog import build_catalog

# A hand-made catalog for hand-computed rewards. Goal: green tea, attributes {organic, caffeine free},
# options {flavor: mint, size: 100 count}, price <= 20  ->  denominator |attrs| + |opts| + 1 = 5.
TARGET = {"asin": "b0t00001", "title": "Leafy Organic Green Tea", "category": "grocery", "product_type": "green tea",
          "brand": "leafy", "attributes": ["organic", "caffeine free"],
          "options": {"flavor": ["mint", "lemon"], "size": ["20 count", "100 count"]}, "price": 12.0,
          "description": "An organic, caffeine free green tea.", "features": ["Organic", "Caffeine free"]}
PRICEY = {**TARGET, "asin": "b0t00002", "title": "Royal Organic Green Tea", "price": 35.0, "brand": "royal"}
HALF = {**TARGET, "asin": "b0t00003", "title": "Plain Green Tea", "attributes": ["kosher"], "brand": "plain"}
COFFEE = {**TARGET, "asin": "b0t00004", "title": "Bold Organic Coffee Beans", "product_type": "coffee beans",
          "attributes": ["organic", "caffeine free"], "options": {"size": ["12 ounce"]}, "brand": "bold"}
SHOES = {**TARGET, "asin": "b0t00005", "title": "Swift Running Shoes", "product_type": "running shoes",
         "category": "clothing", "attributes": ["lightweight"], "options": {"size": ["9"]}, "brand": "swift"}
GOAL = {"goal_id": "g0", "asin": "b0t00001", "product_type": "green tea", "category": "grocery",
        "attributes": ["caffeine free", "organic"], "options": {"flavor": "mint", "size": "100 count"},
        "price_upper": 20.0, "query": "caffeine free organic green tea",
        "instruction": "i am looking for caffeine free and organic green tea with flavor: mint, and size: 100 count, "
                       "and price lower than 20.00 dollars"}


@pytest.fixture()
def tiny_env(tmp_path):
    catalog = {"version": 1, "seed": 0, "label": "test", "products": [TARGET, PRICEY, HALF, COFFEE, SHOES],
               "goals": [GOAL], "splits": {"train": ["g0"], "val": ["g0"]}}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    return WebShopEnv(catalog_path=str(path))


def _buy(env, asin, options=()):
    env.reset("g0")
    env.step("search[tea coffee shoes]")
    env.step(f"click[{asin}]")
    for value in options:
        res = env.step(f"click[{value}]")
        assert not res.info.get("invalid_action"), res.observation
    return env.step("click[buy now]")


@pytest.mark.parametrize("asin,options,expected", [
    ("b0t00001", ("mint", "100 count"), 1.0),            # everything matches
    ("b0t00001", ("lemon", "100 count"), 4 / 5),         # wrong flavor: (2 + 1 + 1) / 5
    ("b0t00001", ("mint",), 4 / 5),                      # size not selected: (2 + 1 + 1) / 5
    ("b0t00001", (), 3 / 5),                             # no options selected: (2 + 0 + 1) / 5
    ("b0t00002", ("mint", "100 count"), 4 / 5),          # over the price bound: (2 + 2 + 0) / 5
    ("b0t00003", ("mint", "100 count"), 3 / 5),          # neither attribute: (0 + 2 + 1) / 5
    ("b0t00004", ("12 ounce",), (2 + 0 + 1) / 5 * 0.5),  # other product type, same category: r_type 0.5
    ("b0t00005", ("9",), (0 + 0 + 1) / 5 * 0.1),         # other type and category: r_type 0.1
])
def test_near_miss_rewards_match_hand_computed_values(tiny_env, asin, options, expected):
    res = _buy(tiny_env, asin, options)
    assert res.done
    assert res.reward == pytest.approx(expected)
    assert res.info["success"] is (expected == 1.0)
    if expected < 1.0:
        assert res.info["error"]


def test_reward_function_breakdown():
    r, b = webshop_reward(GOAL, PRICEY, {"flavor": "mint", "size": "100 count"})
    assert r == pytest.approx(0.8)
    assert b == {"attributes_matched": 2, "attributes": 2, "options_matched": 2, "options": 2, "price_ok": False,
                 "r_type": 1.0}
    # attributes also match through the title's tokens
    r, _ = webshop_reward(GOAL, {**HALF, "title": "Organic Caffeine Free Green Tea"}, {"flavor": "mint",
                                                                                         "size": "100 count"})
    assert r == pytest.approx(1.0)


def test_invalid_actions_get_the_invalid_action_observation(tiny_env):
    obs = tiny_env.reset("g0")
    assert obs.text.startswith("WebShop [SEP] Instruction: [SEP] i am looking for")
    for bad, why in [("buy it", "cannot parse"), ("click[buy now]", "search page has no buttons"),
                     ("search[]", "empty")]:
        res = tiny_env.step(bad)
        assert res.info["invalid_action"] is True and why in res.info["error"]
        assert res.observation.startswith("Invalid action:") and res.info["anchor"] == obs.info["anchor"]
        assert not res.done and res.reward == 0.0
    tiny_env.step("search[green tea]")
    res = tiny_env.step("click[b0t99999]")
    assert res.info["invalid_action"] and "no button" in res.info["error"]
    res = tiny_env.step("search[again]")
    assert res.info["invalid_action"] and "back to search" in res.info["error"]
    res = tiny_env.invalid_action("garbage", "no <action> tag")
    assert res.info["invalid_action"] and res.observation.startswith("Invalid action: no <action> tag.")


def test_page_flow_and_buttons(tiny_env):
    tiny_env.reset("g0")
    res = tiny_env.step("search[organic green tea]")
    assert "Page 1 (Total results:" in res.observation and "B0T00001" in res.info["anchor"]
    assert "click[b0t00001]" in res.info["admissible_actions"]
    res = tiny_env.step("CLICK[B0T00001]")  # case-insensitive buttons
    assert res.info["page"] == "item" and "click[buy now]" in res.info["admissible_actions"]
    res = tiny_env.step("click[description]")
    assert "An organic, caffeine free green tea." in res.observation
    res = tiny_env.step("click[< prev]")
    assert res.info["page"] == "item"
    res = tiny_env.step("click[mint]")
    assert "[mint]" in res.info["anchor"]
    res = tiny_env.step("click[< prev]")
    assert res.info["page"] == "results"
    res = tiny_env.step("click[back to search]")
    assert res.info["page"] == "search"


def test_step_limit_ends_episode(tiny_env):
    tiny_env.max_steps = 3
    tiny_env.reset("g0")
    tiny_env.step("search[tea]")
    tiny_env.step("click[b0t00001]")
    res = tiny_env.step("click[< prev]")
    assert res.done and res.reward == 0.0 and res.info["success"] is False


def test_parse_action_and_bm25():
    assert parse_action(" click[ Buy  Now ] ") == ("click", "Buy Now", None)
    assert parse_action("search[a b]") == ("search", "a b", None)
    assert parse_action("go north")[2]
    index = BM25Index(["red apple", "green tea organic", "green apple"])
    assert index.search("green tea") == [1, 2]
    assert index.search("banana") == []


def test_shipped_catalog_is_deterministic_and_labelled():
    shipped = json.loads(default_catalog_path().read_text())
    assert "not comparable to published WebShop scores" in shipped["label"]
    assert shipped == json.loads(json.dumps(build_catalog(shipped["seed"]), sort_keys=True))
    assert len(shipped["products"]) >= 200
    assert not set(shipped["splits"]["train"]) & set(shipped["splits"]["val"])


def test_oracle_buys_every_target_in_process():
    env = make_env("webshop")
    for split in ("val", "train"):
        for task in env.task_ids(split):
            env.reset(task)
            for _ in range(15):
                res = env.step(env.oracle_action())
                assert not res.info.get("invalid_action")
                if res.done:
                    break
            assert res.done and res.reward == 1.0 and res.info["success"], task
            assert res.info["bought"] == env.goal["asin"]


def test_env_check_oracle_and_random_through_workers():
    from verl_hindsight.agent_loops.env_check import run_env_check

    reports = run_env_check("webshop", policy="oracle", tasks=30, workers=2, split="val")
    assert len(reports) == 30
    assert all(r.success and r.reward == 1.0 and r.failure is None for r in reports)
    random_reports = run_env_check("webshop", policy="random", tasks=10, workers=1, split="val")
    assert all(r.failure is None for r in random_reports)
    assert [r.task_id for r in reports[:10]] == [r.task_id for r in random_reports]


def test_original_backend_names_how_to_install():
    try:
        import web_agent_site  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="princeton-nlp/WebShop"):
            WebShopEnv(backend="original")
    else:  # pragma: no cover - only with the original package installed
        pytest.skip("web_agent_site is installed; the error path is not reachable")
