"""Synthetic card transactions with labelled fraud episodes, for the demo, the tests and the generator benchmark.

`generate(accounts, days, seed)` returns canonical transactions (`apps.finance.schema`) plus a `scenario`
column. **`scenario` names the episode that produced each row and is derived from the label: it must
never be a model feature** (it is listed in `schema.NON_FEATURE_COLUMNS`).

Genuine behaviour (vectorised over all card-days):

- a world of merchants in 10 countries and 18 merchant categories (ISO 18245 MCCs), each merchant either
  in-person or online; ids are shuffled, so an id says nothing about country, category or fraud;
- card profiles: home country, activity rate (median ~2 transactions a day, heavy-tailed), weekday and
  weekend rhythm, three daily peaks with a personal shift, category preferences (Dirichlet), online
  propensity, chip/contactless/swipe mix (contactless only below 100), spending scale;
- amounts lognormal per category (micro amounts are genuine too: parking, digital goods);
- about 60% of purchases at 8 favourite merchants; monthly subscriptions at a fixed amount and day;
- trips abroad: in-person purchases in the destination country for 2-8 days.

Fraud episodes (about 1% of rows in all, roughly a quarter from each; at least one episode of each kind
is drawn, so sets under ~10,000 card-days have a higher rate). Each shows as a pattern over the card's
sequence or across cards rather than as one telling field value; amounts are scaled to what the card
usually spends in that category, not to fixed fraud-only ranges:

- `card_testing`: 2-5 micro amounts (0.50-3.00) at new online merchants minutes apart, then hours later
  a burst of 2-7 online purchases at ~2.5x the card's usual spend;
- `account_takeover`: the account appears on a channel new to it (online for in-store people, a swipe
  for online people) in a country new to it, then 3-6 draining amounts (~3x usual; transfers,
  electronics, jewellery) an hour or two apart;
- `compromised_merchant`: a skimmed in-person merchant; cards that shop there during its 5-15 day
  compromise window are cloned (60%) and swiped elsewhere 0.5-7 days later (common point of purchase);
- `credential_leak`: an online merchant is breached; a batch of its earlier customers is cashed out in
  quick online sprees (2-5 purchases) at a few shared merchants, all within 1-3 days, a few days later.

No label leaks: fraud rows use ordinary merchants of the same world that also have genuine customers;
fraud happens at daytime-like hours; ids (`T000000001`, `A000123`, `M000456`) are shuffled or assigned
in time order after all rows are mixed, with random tie-breaking. On 1,000 cards x 60 days a
gradient-boosting model on per-row fields reaches an average precision of about 0.25-0.3 on the later
40% of the period, about 0.45-0.55 once simple per-card history features are added.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apps.finance.schema import (
    CANONICAL_COLUMNS,
    LABEL_COLUMN,
    SCENARIO_COLUMN,
    SOURCE_ROW,
    TEXT_DTYPE,
    TIMESTAMP_DTYPE,
)
from apps.finance.sources import write_table
from core.errors import ConfigError

SCENARIOS: tuple[str, ...] = (
    "genuine",
    "card_testing",
    "account_takeover",
    "compromised_merchant",
    "credential_leak",
)
"""Values of the `scenario` column; every one but `genuine` has `is_fraud = 1`."""

CHANNEL_CODES: tuple[str, ...] = ("chip", "contactless", "swipe", "online")
"""Channels the generator writes (the preferred vocabulary of `schema.CHANNELS`)."""

COUNTRIES: tuple[str, ...] = ("US", "GB", "CA", "DE", "FR", "MX", "ES", "IT", "JP", "TH")
"""Merchant countries of the generated world (ISO 3166-1 alpha-2); cards live in the first seven."""

_HOME_WEIGHTS = np.array([0.70, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03, 0.0, 0.0, 0.0])
_MERCHANT_WEIGHTS = np.array([0.50, 0.08, 0.07, 0.07, 0.06, 0.06, 0.06, 0.05, 0.03, 0.02])

# MCC, median amount, lognormal sigma, share of purchases made online, weight in an average card's basket.
_CATEGORIES = (
    ("5411", 42.0, 0.55, 0.05, 0.20),  # grocery
    ("5812", 32.0, 0.50, 0.05, 0.10),  # restaurants
    ("5814", 9.0, 0.45, 0.10, 0.12),  # fast food
    ("5541", 45.0, 0.35, 0.00, 0.08),  # fuel
    ("5311", 55.0, 0.80, 0.35, 0.06),  # department stores
    ("5999", 25.0, 0.90, 0.40, 0.07),  # miscellaneous retail
    ("5912", 18.0, 0.70, 0.10, 0.05),  # pharmacies
    ("4121", 17.0, 0.50, 0.80, 0.05),  # taxis and ride hailing
    ("7523", 4.0, 0.50, 0.30, 0.03),  # parking: genuine micro amounts
    ("5818", 3.0, 0.80, 1.00, 0.05),  # digital goods: genuine micro amounts online
    ("5964", 35.0, 0.90, 1.00, 0.07),  # online marketplaces
    ("5732", 140.0, 0.90, 0.50, 0.03),  # electronics
    ("5944", 180.0, 0.90, 0.20, 0.01),  # jewellery
    ("4511", 320.0, 0.50, 0.90, 0.005),  # airlines
    ("7011", 170.0, 0.55, 0.60, 0.01),  # hotels
    ("4829", 150.0, 0.90, 0.70, 0.015),  # money transfer
    ("4899", 14.0, 0.30, 1.00, 0.0),  # streaming and cable: subscriptions only
    ("4900", 85.0, 0.35, 1.00, 0.0),  # utilities: subscriptions only
)
_MCC = np.array([c[0] for c in _CATEGORIES])
_LOG_MEDIAN = np.log([c[1] for c in _CATEGORIES])
_SIGMA = np.array([c[2] for c in _CATEGORIES])
_ONLINE_SHARE = np.array([c[3] for c in _CATEGORIES])
_BASKET = np.array([c[4] for c in _CATEGORIES])
_CATEGORY = {code: i for i, code in enumerate(_MCC)}
_SUBSCRIPTIONS = np.array([_CATEGORY["4899"], _CATEGORY["4900"]])

# Expected episodes per card-day; they give about 1% fraud rows (a quarter from each scenario).
_RATES = {
    "card_testing": 0.0007,
    "account_takeover": 0.0010,
    "compromised_merchant": 0.0020,  # cloned cards
    "credential_leak": 0.0018,  # leaked cards
}
_DAY = 86_400.0
_WEEKDAY_FACTOR = np.array([0.95, 0.95, 1.0, 1.0, 1.1, 1.15, 0.85])  # Monday first
_PEAK_HOURS = np.array([8.0, 12.5, 19.0])
_FAVOURITES = 8


@dataclass(frozen=True)
class _World:
    """Merchants, grouped by (country, category, online) so a random merchant of a group is one lookup."""

    country: np.ndarray  # (M,) index into COUNTRIES
    category: np.ndarray  # (M,) index into _CATEGORIES
    online: np.ndarray  # (M,) bool
    group_start: np.ndarray  # (G,) first merchant of each group
    group_size: np.ndarray  # (G,)

    @staticmethod
    def group(country: np.ndarray, category: np.ndarray, online: np.ndarray) -> np.ndarray:
        return (country * len(_CATEGORIES) + category) * 2 + online.astype(np.int64)

    def pick(
        self, rng: np.random.Generator, country: np.ndarray, category: np.ndarray, online: np.ndarray
    ) -> np.ndarray:
        g = self.group(np.asarray(country), np.asarray(category), np.asarray(online))
        return self.group_start[g] + (rng.random(g.shape) * self.group_size[g]).astype(np.int64)


@dataclass(frozen=True)
class _Cards:
    home: np.ndarray  # (A,) country index
    rate: np.ndarray  # (A,) transactions per day
    weekend: np.ndarray  # (A,) weekend multiplier
    peaks: np.ndarray  # (A, 3) weight of each daily peak
    shift: np.ndarray  # (A,) personal shift of the peaks, hours
    basket: np.ndarray  # (A, K) category preferences
    online: np.ndarray  # (A,) multiplier of each category's online share
    contactless: np.ndarray  # (A,) share of in-person purchases made contactless
    swipe: np.ndarray  # (A,) share made by swiping
    scale: np.ndarray  # (A,) spending scale
    loyalty: np.ndarray  # (A,) probability that a purchase goes to a favourite merchant
    favourites: np.ndarray  # (A, F) merchant indices


@dataclass
class _Rows:
    """Parallel arrays, one entry per transaction; category and country come from the merchant."""

    account: np.ndarray
    seconds: np.ndarray  # since the start of the period
    merchant: np.ndarray
    amount: np.ndarray
    channel: np.ndarray  # index into CHANNEL_CODES
    scenario: int

    @staticmethod
    def concat(parts: list[_Rows]) -> tuple[np.ndarray, ...]:
        empty = _Rows(*(np.zeros(0, dtype=t) for t in (np.int64, float, np.int64, float, np.int64)), 0)
        parts = [empty, *(p for p in parts if len(p.account))]
        scenario = np.concatenate([np.full(len(p.account), p.scenario, dtype=np.int8) for p in parts])
        fields = ("account", "seconds", "merchant", "amount", "channel")
        return (*(np.concatenate([getattr(p, f) for p in parts]) for f in fields), scenario)


def generate(
    accounts: int, days: int, seed: int, start: str | dt.datetime | pd.Timestamp = "2024-01-01"
) -> pd.DataFrame:
    """Generate card transactions with fraud episodes (see the module docstring for the model).

    About 1,000 accounts x 30 days (~80,000 rows) take well under a second.

    Args:
        accounts: Number of cards (>= 1).
        days: Length of the period in days (>= 1).
        seed: Seed of the only random generator used: equal arguments give equal frames.
        start: First day (midnight); text or naive datetimes are taken as UTC.

    Returns:
        Canonical transactions (`schema.CANONICAL_DTYPES`, `is_fraud` included) plus `scenario` (one of
        `SCENARIOS`, text; never a feature), ordered by time, `transaction_id` increasing with time,
        indexed 1..N (`SOURCE_ROW`), as if read from a file.

    Raises:
        ConfigError: `accounts` or `days` is not a positive integer, or `start` is not a date.
    """
    for name, value in (("accounts", accounts), ("days", days)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    try:
        origin = pd.Timestamp(start)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"start must be a date such as '2024-01-01'; got {start!r}") from e
    origin = (origin.tz_localize("UTC") if origin.tzinfo is None else origin.tz_convert("UTC")).normalize()
    rng = np.random.default_rng(seed)
    world = _make_world(max(500, int(1.5 * accounts)), rng)
    cards = _make_cards(accounts, world, rng)
    genuine = _genuine(cards, world, days, origin, rng)
    subscriptions = _subscriptions(cards, world, days, origin, rng)
    scene = _Scene.build(cards, world, days, rng, _Rows.concat([genuine, subscriptions]))
    parts = [
        genuine,
        subscriptions,
        _card_testing(scene),
        _account_takeover(scene),
        _compromised_merchants(scene),
        _credential_leaks(scene),
    ]
    return _assemble(_Rows.concat(parts), world, origin, days, rng)


def write(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write generated transactions to `.csv`, `.csv.gz` or `.parquet`, chosen by the suffix.

    Args:
        df: Output of `generate`.
        path: Destination file.

    Returns:
        The path written.

    Raises:
        AdapterError: Unsupported suffix or unwritable path.
    """
    return write_table(df, path)


def _make_world(size: int, rng: np.random.Generator) -> _World:
    n_countries, n_categories = len(COUNTRIES), len(_CATEGORIES)
    weight = np.maximum(_BASKET, 0.02)  # every category, even rare ones, has merchants everywhere
    share = np.stack([1.0 - _ONLINE_SHARE, _ONLINE_SHARE], axis=-1)  # (K, 2)
    expected = size * _MERCHANT_WEIGHTS[:, None, None] * (weight / weight.sum())[None, :, None] * share[None]
    group_size = np.maximum(1, np.round(expected)).astype(np.int64).reshape(-1)  # (C*K*2,)
    group_start = np.concatenate([[0], np.cumsum(group_size)[:-1]])
    country, category, online = np.unravel_index(np.arange(group_size.size), (n_countries, n_categories, 2))
    return _World(
        country=np.repeat(country, group_size),
        category=np.repeat(category, group_size),
        online=np.repeat(online, group_size).astype(bool),
        group_start=group_start,
        group_size=group_size,
    )


def _make_cards(accounts: int, world: _World, rng: np.random.Generator) -> _Cards:
    n_categories = len(_CATEGORIES)
    home = rng.choice(len(COUNTRIES), size=accounts, p=_HOME_WEIGHTS / _HOME_WEIGHTS.sum())
    basket = rng.dirichlet(np.maximum(_BASKET, 1e-3) * 8.0, size=accounts)
    online = np.clip(rng.lognormal(0.0, 0.5, accounts), 0.2, 3.0)
    swipe = rng.beta(1.0, 8.0, accounts)
    contactless = (1.0 - swipe) * rng.beta(2.0, 2.0, accounts)
    slots = (accounts, _FAVOURITES)
    fav_category = (rng.random(slots)[..., None] > np.cumsum(basket, axis=1)[:, None, :]).sum(-1)
    fav_category = np.minimum(fav_category, n_categories - 1)
    fav_online = rng.random(slots) < np.clip(_ONLINE_SHARE[fav_category] * online[:, None], 0.0, 1.0)
    favourites = world.pick(rng, np.repeat(home[:, None], _FAVOURITES, axis=1), fav_category, fav_online)
    return _Cards(
        home=home,
        rate=np.clip(rng.lognormal(np.log(2.0), 0.6, accounts), 0.15, 15.0),
        weekend=rng.lognormal(0.0, 0.25, accounts),
        peaks=rng.dirichlet([2.0, 2.0, 2.0], size=accounts),
        shift=rng.normal(0.0, 1.0, accounts),
        basket=basket,
        online=online,
        contactless=contactless,
        swipe=swipe,
        scale=rng.lognormal(0.0, 0.35, accounts),
        loyalty=rng.beta(6.0, 4.0, accounts),
        favourites=favourites,
    )


def _travel(cards: _Cards, days: int, rng: np.random.Generator) -> np.ndarray:
    """Country of each card on each day, (A, D): home, or a destination during trips."""
    accounts = len(cards.home)
    where = np.repeat(cards.home[:, None], days, axis=1)
    trips = rng.poisson(days / 30.0 * rng.exponential(0.25, accounts))
    account = np.repeat(np.arange(accounts), trips)
    first = rng.integers(0, days, account.size)
    length = rng.integers(2, 9, account.size)
    destination = (cards.home[account] + rng.integers(1, len(COUNTRIES), account.size)) % len(COUNTRIES)
    day_offset = np.arange(8)
    rows = np.repeat(account, 8)
    cols = (first[:, None] + day_offset[None, :]).reshape(-1)
    keep = (day_offset[None, :] < length[:, None]).reshape(-1) & (cols < days)
    where[rows[keep], cols[keep]] = np.repeat(destination, 8)[keep]
    return where


def _genuine(
    cards: _Cards, world: _World, days: int, origin: pd.Timestamp, rng: np.random.Generator
) -> _Rows:
    accounts = len(cards.home)
    weekday = (origin.day_of_week + np.arange(days)) % 7
    expected = cards.rate[:, None] * _WEEKDAY_FACTOR[weekday][None, :]
    expected = expected * np.where(weekday >= 5, cards.weekend[:, None], 1.0)
    counts = rng.poisson(expected)  # (A, D)
    account = np.repeat(np.arange(accounts), counts.sum(axis=1))
    day = np.repeat(np.tile(np.arange(days), accounts), counts.reshape(-1))
    n = account.size

    peak = (rng.random(n)[:, None] > np.cumsum(cards.peaks[account], axis=1)).sum(1).clip(0, 2)
    hour = _PEAK_HOURS[peak] + cards.shift[account] + rng.normal(0.0, 1.5, n)
    hour = np.where(rng.random(n) < 0.04, rng.uniform(0.0, 24.0, n), hour) % 24.0  # a few night owls
    seconds = day * _DAY + hour * 3600.0

    location = _travel(cards, days, rng)[account, day]
    away = location != cards.home[account]
    category = (rng.random(n)[:, None] > np.cumsum(cards.basket[account], axis=1)).sum(1)
    category = np.minimum(category, len(_CATEGORIES) - 1)
    online = rng.random(n) < np.clip(_ONLINE_SHARE[category] * cards.online[account], 0.0, 1.0)
    merchant_country = np.where(
        online & (rng.random(n) > 0.7),
        rng.choice(len(COUNTRIES), size=n, p=_MERCHANT_WEIGHTS),
        np.where(online, cards.home[account], location),
    )
    merchant = world.pick(rng, merchant_country, category, online)

    slot = np.minimum(rng.zipf(1.6, n) - 1, _FAVOURITES - 1)  # a few favourites take most visits
    favourite = cards.favourites[account, slot]
    use_favourite = (rng.random(n) < cards.loyalty[account]) & ~(away & ~world.online[favourite])
    merchant = np.where(use_favourite, favourite, merchant)

    category = world.category[merchant]
    amount = rng.lognormal(_LOG_MEDIAN[category] + np.log(cards.scale[account]), _SIGMA[category])
    channel = _in_person_channel(cards, account, amount, rng)
    channel = np.where(world.online[merchant], CHANNEL_CODES.index("online"), channel)
    return _Rows(account, seconds, merchant, amount, channel, SCENARIOS.index("genuine"))


def _in_person_channel(
    cards: _Cards, account: np.ndarray, amount: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    u = rng.random(account.size)
    channel = np.where(
        u < cards.swipe[account],
        CHANNEL_CODES.index("swipe"),
        np.where(
            u < cards.swipe[account] + cards.contactless[account], CHANNEL_CODES.index("contactless"), 0
        ),
    )
    # Contactless payments have a per-purchase limit; above it the card is inserted.
    return np.where(
        (channel == CHANNEL_CODES.index("contactless")) & (amount > 100.0),
        CHANNEL_CODES.index("chip"),
        channel,
    )


def _subscriptions(
    cards: _Cards, world: _World, days: int, origin: pd.Timestamp, rng: np.random.Generator
) -> _Rows:
    count = np.minimum(rng.poisson(1.2, len(cards.home)), 4)
    account = np.repeat(np.arange(len(cards.home)), count)
    category = rng.choice(_SUBSCRIPTIONS, size=account.size)
    merchant = world.pick(rng, cards.home[account], category, np.ones(account.size, dtype=bool))
    amount = np.round(rng.lognormal(_LOG_MEDIAN[category], _SIGMA[category]), 2)
    day_of_month = rng.integers(1, 29, account.size)
    hour = rng.uniform(0.0, 6.0, account.size)  # billing runs at night
    calendar = (origin + pd.to_timedelta(np.arange(days), unit="D")).day.to_numpy()
    sub, day = np.nonzero(day_of_month[:, None] == calendar[None, :])
    seconds = day * _DAY + hour[sub] * 3600.0
    channel = np.full(sub.size, CHANNEL_CODES.index("online"))
    return _Rows(account[sub], seconds, merchant[sub], amount[sub], channel, SCENARIOS.index("genuine"))


@dataclass(frozen=True)
class _Scene:
    """What the fraud episodes draw on: the cards, the world, and who shopped where (genuine rows only)."""

    cards: _Cards
    world: _World
    days: int
    rng: np.random.Generator
    visit_account: np.ndarray  # genuine visits sorted by merchant
    visit_seconds: np.ndarray
    visit_offset: np.ndarray  # (M + 1,) visits of merchant m: visit_offset[m]:visit_offset[m + 1]

    @staticmethod
    def build(
        cards: _Cards, world: _World, days: int, rng: np.random.Generator, everyday: tuple[np.ndarray, ...]
    ) -> _Scene:
        account, seconds, merchant = everyday[0], everyday[1], everyday[2]
        order = np.argsort(merchant, kind="stable")
        counts = np.bincount(merchant, minlength=world.country.size)
        offset = np.concatenate([[0], np.cumsum(counts)])
        return _Scene(cards, world, days, rng, account[order], seconds[order], offset)

    @property
    def visits(self) -> np.ndarray:
        return np.diff(self.visit_offset)

    def episodes(self, scenario: str) -> int:
        return max(1, int(self.rng.poisson(_RATES[scenario] * len(self.cards.home) * self.days)))

    def merchants(self, country: np.ndarray, category: np.ndarray, online: np.ndarray) -> np.ndarray:
        """Ordinary merchants for fraud rows: ones that also have genuine customers, so no id is fraud-only."""
        merchant = self.world.pick(self.rng, country, category, online)
        idle = np.flatnonzero(self.visits[merchant] == 0)
        if idle.size:
            # Swap in a merchant of the same category and kind (any country) that has genuine customers.
            w = self.world
            active = np.flatnonzero(self.visits > 0)
            kind = w.category * 2 + w.online
            active = active[np.argsort(kind[active], kind="stable")]
            size = np.bincount(kind[active], minlength=2 * len(_CATEGORIES))
            start = np.concatenate([[0], np.cumsum(size)[:-1]])
            wanted = kind[merchant[idle]]
            pick = start[wanted] + (self.rng.random(idle.size) * size[wanted]).astype(np.int64)
            fallback = self.rng.integers(0, active.size, idle.size)
            merchant[idle] = active[np.where(size[wanted] > 0, pick, fallback)]
        return merchant

    def online_merchants(self, n: int, categories: tuple[str, ...]) -> np.ndarray:
        country = self.rng.choice(len(COUNTRIES), size=n, p=_MERCHANT_WEIGHTS)
        category = self.rng.choice([_CATEGORY[c] for c in categories], size=n)
        return self.merchants(country, category, np.ones(n, dtype=bool))

    def typical_amount(
        self, account: np.ndarray, merchant: np.ndarray, factor: float, spread: float
    ) -> np.ndarray:
        """About `factor` times what this card usually spends in the merchant's category."""
        category = self.world.category[merchant]
        usual = np.exp(_LOG_MEDIAN[category]) * self.cards.scale[account]
        return usual * self.rng.lognormal(np.log(factor), spread, account.size)

    def daytime(self, n: int, first_day: float, last_day: float) -> np.ndarray:
        """Seconds at a random day in [first_day, last_day) and an hour following people's daily rhythm."""
        day = np.floor(self.rng.uniform(first_day, max(last_day, first_day + 1e-9), n))
        hour = _PEAK_HOURS[self.rng.integers(0, 3, n)] + self.rng.normal(0.0, 2.0, n)
        hour = np.where(self.rng.random(n) < 0.15, self.rng.uniform(0.0, 24.0, n), hour) % 24.0
        return day * _DAY + hour * 3600.0


def _card_testing(scene: _Scene) -> _Rows:
    rng = scene.rng
    victims = rng.choice(len(scene.cards.home), size=scene.episodes("card_testing"))
    tests = rng.integers(2, 6, victims.size)
    bursts = rng.integers(2, 8, victims.size)
    start = scene.daytime(victims.size, 0.0, scene.days - 1.0)
    probe_account = np.repeat(victims, tests)
    probe_time = np.repeat(start, tests) + _grouped_cumsum(rng.exponential(180.0, probe_account.size), tests)
    probe_merchant = scene.online_merchants(probe_account.size, ("5818", "5999", "5964"))
    probe_amount = rng.uniform(0.5, 3.0, probe_account.size)
    pause = np.clip(rng.exponential(6 * 3600.0, victims.size), 1200.0, 36 * 3600.0)
    burst_account = np.repeat(victims, bursts)
    burst_time = np.repeat(start + pause, bursts) + _grouped_cumsum(
        rng.exponential(1200.0, burst_account.size), bursts
    )
    burst_merchant = scene.online_merchants(burst_account.size, ("5732", "5964", "5999", "5311"))
    burst_amount = scene.typical_amount(burst_account, burst_merchant, 2.5, 0.5)
    account = np.concatenate([probe_account, burst_account])
    return _Rows(
        account,
        np.concatenate([probe_time, burst_time]),
        np.concatenate([probe_merchant, burst_merchant]),
        np.concatenate([probe_amount, burst_amount]),
        np.full(account.size, CHANNEL_CODES.index("online")),
        SCENARIOS.index("card_testing"),
    )


def _account_takeover(scene: _Scene) -> _Rows:
    rng, cards = scene.rng, scene.cards
    victims = rng.choice(len(cards.home), size=scene.episodes("account_takeover"))
    probes = rng.integers(1, 3, victims.size)
    drains = rng.integers(3, 7, victims.size)
    size = probes + drains
    # The fraudster uses what the owner does not: online for in-store people, a cloned swipe otherwise.
    new_online = cards.online[victims] < np.median(cards.online)
    new_country = (cards.home[victims] + rng.integers(1, len(COUNTRIES), victims.size)) % len(COUNTRIES)
    start = scene.daytime(victims.size, 1.0, scene.days - 0.5)
    account = np.repeat(victims, size)
    seconds = np.repeat(start, size) + _grouped_cumsum(rng.exponential(2 * 3600.0, account.size), size)
    is_drain = np.arange(account.size) - np.repeat(np.cumsum(size) - size, size) >= np.repeat(probes, size)
    drain_category = rng.choice(
        [_CATEGORY[c] for c in ("4829", "5732", "5944", "5964", "5311")], size=account.size
    )
    probe_category = rng.choice([_CATEGORY[c] for c in ("5999", "5812", "5814")], size=account.size)
    online = np.repeat(new_online, size)
    merchant = scene.merchants(
        np.repeat(new_country, size), np.where(is_drain, drain_category, probe_category), online
    )
    amount = np.where(
        is_drain,
        scene.typical_amount(account, merchant, 3.0, 0.4),
        scene.typical_amount(account, merchant, 1.0, 0.4),
    )
    channel = np.where(online, CHANNEL_CODES.index("online"), CHANNEL_CODES.index("swipe"))
    return _Rows(account, seconds, merchant, amount, channel, SCENARIOS.index("account_takeover"))


def _compromised_merchants(scene: _Scene) -> _Rows:
    rng, cards, world = scene.rng, scene.cards, scene.world
    target = scene.episodes("compromised_merchant")
    in_person = np.flatnonzero(~world.online & (scene.visits > 0))
    victim_parts, skim_parts = [], []
    found = 0
    for merchant in _weighted_order(in_person, scene.visits[in_person], rng):
        window = rng.uniform(5.0, 15.0) * _DAY
        opened = rng.uniform(0.0, max(scene.days * _DAY - window, 1.0))
        visit = slice(scene.visit_offset[merchant], scene.visit_offset[merchant + 1])
        inside = (scene.visit_seconds[visit] >= opened) & (scene.visit_seconds[visit] < opened + window)
        who, first = np.unique(scene.visit_account[visit][inside], return_index=True)
        cloned = rng.random(who.size) < 0.6
        victim_parts.append(who[cloned])
        skim_parts.append(scene.visit_seconds[visit][inside][first][cloned])
        found += int(cloned.sum())
        if found >= target:
            break
    victims = np.concatenate([*victim_parts, np.zeros(0, dtype=np.int64)])[:target]
    skimmed = np.concatenate([*skim_parts, np.zeros(0)])[:target]
    uses = rng.integers(2, 6, victims.size)
    account = np.repeat(victims, uses)
    delay = scene.daytime(victims.size, 0.5, 7.0)  # the clone is used from half a day to a week later
    seconds = np.repeat(skimmed + delay, uses) + _grouped_cumsum(
        rng.exponential(3 * 3600.0, account.size), uses
    )
    abroad = np.repeat(rng.random(victims.size) < 0.3, uses)
    elsewhere = (cards.home[account] + rng.integers(1, len(COUNTRIES), account.size)) % len(COUNTRIES)
    country = np.where(abroad, elsewhere, cards.home[account])
    category = rng.choice(
        [_CATEGORY[c] for c in ("5411", "5541", "5311", "5999", "5732", "5812")], size=account.size
    )
    merchant = scene.merchants(country, category, np.zeros(account.size, dtype=bool))
    amount = scene.typical_amount(account, merchant, 1.8, 0.5)
    channel = np.full(account.size, CHANNEL_CODES.index("swipe"))  # a cloned magnetic stripe
    return _Rows(account, seconds, merchant, amount, channel, SCENARIOS.index("compromised_merchant"))


def _credential_leaks(scene: _Scene) -> _Rows:
    rng = scene.rng
    target = scene.episodes("credential_leak")
    online = np.flatnonzero(scene.world.online & (scene.visits > 0))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    leaked_total = 0
    for merchant in _weighted_order(online, scene.visits[online], rng):
        breach = rng.uniform(0.05, 0.95) * scene.days * _DAY
        visit = slice(scene.visit_offset[merchant], scene.visit_offset[merchant + 1])
        customers = np.unique(scene.visit_account[visit][scene.visit_seconds[visit] < breach])
        if customers.size == 0:
            continue
        leaked = rng.permutation(customers)[: max(1, int(customers.size * rng.uniform(0.3, 0.8)))]
        leaked = leaked[: target - leaked_total]
        leaked_total += leaked.size
        uses = rng.integers(2, 6, leaked.size)
        cash_out = scene.online_merchants(3, ("5964", "5818", "5999", "5311", "5732"))
        victim = np.repeat(leaked, uses)
        # Each leaked card is cashed out in a quick spree inside the batch's window of 1-3 days.
        first_day = np.floor(breach / _DAY) + rng.uniform(1.0, 4.0)
        spree = scene.daytime(leaked.size, first_day, first_day + rng.uniform(1.0, 3.0))
        when = np.repeat(spree, uses) + _grouped_cumsum(rng.exponential(1800.0, victim.size), uses)
        parts.append((victim, when, rng.choice(cash_out, size=victim.size)))
        if leaked_total >= target:
            break
    victim = np.concatenate([*(p[0] for p in parts), np.zeros(0, dtype=np.int64)])
    when = np.concatenate([*(p[1] for p in parts), np.zeros(0)])
    merchant = np.concatenate([*(p[2] for p in parts), np.zeros(0, dtype=np.int64)])
    amount = scene.typical_amount(victim, merchant, 1.5, 0.5)
    channel = np.full(victim.size, CHANNEL_CODES.index("online"))
    return _Rows(victim, when, merchant, amount, channel, SCENARIOS.index("credential_leak"))


def _weighted_order(items: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random order of `items`, heavier ones earlier (weighted sampling without replacement, in O(n log n))."""
    keys = rng.exponential(1.0, items.size) / weights
    return items[np.argsort(keys, kind="stable")]


def _grouped_cumsum(gaps: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every group of `sizes` consecutive entries (first entry of a group: 0)."""
    total = np.cumsum(gaps)
    first = np.cumsum(sizes) - sizes
    return total - np.repeat(total[first], sizes)


def _assemble(
    rows: tuple[np.ndarray, ...], world: _World, origin: pd.Timestamp, days: int, rng: np.random.Generator
) -> pd.DataFrame:
    account, seconds, merchant, amount, channel, scenario = rows
    seconds = np.floor(seconds)
    keep = (seconds >= 0) & (seconds < days * _DAY)  # episodes running past the end are cut there
    account, seconds, merchant, amount, channel, scenario = (
        a[keep] for a in (account, seconds, merchant, amount, channel, scenario)
    )
    order = np.lexsort(
        (rng.random(seconds.size), seconds)
    )  # random tie-break: row order says nothing of the label
    account, seconds, merchant, amount, channel, scenario = (
        a[order] for a in (account, seconds, merchant, amount, channel, scenario)
    )

    account_names = np.array([f"A{i:06d}" for i in rng.permutation(int(account.max(initial=0)) + 1)])
    merchant_names = np.array([f"M{i:06d}" for i in rng.permutation(world.country.size)])
    n = seconds.size
    timestamp = pd.DatetimeIndex(origin + pd.to_timedelta(seconds.astype(np.int64), unit="s"))
    frame = pd.DataFrame(
        {
            "transaction_id": pd.array([f"T{i:09d}" for i in range(1, n + 1)], dtype=TEXT_DTYPE),
            "account_id": pd.array(account_names[account], dtype=TEXT_DTYPE),
            "timestamp": timestamp.as_unit("us").array,
            "amount": np.round(np.maximum(amount, 0.01), 2),
            "merchant_id": pd.array(merchant_names[merchant], dtype=TEXT_DTYPE),
            "merchant_category": pd.array(_MCC[world.category[merchant]], dtype=TEXT_DTYPE),
            "channel": pd.array(np.array(CHANNEL_CODES)[channel], dtype=TEXT_DTYPE),
            "country": pd.array(np.array(COUNTRIES)[world.country[merchant]], dtype=TEXT_DTYPE),
            LABEL_COLUMN: (scenario > 0).astype(np.int8),
            SCENARIO_COLUMN: pd.array(np.array(SCENARIOS)[scenario], dtype=TEXT_DTYPE),
        },
        index=pd.RangeIndex(1, n + 1, name=SOURCE_ROW),
    )
    assert list(frame.columns[: len(CANONICAL_COLUMNS)]) == list(CANONICAL_COLUMNS)
    assert frame["timestamp"].dtype == TIMESTAMP_DTYPE
    return frame
