"""Framework callbacks: PyTorch Lightning, the Hugging Face Trainer, Keras 3.

One module per framework (:mod:`~carbonoffset.integrations.lightning`,
:mod:`~carbonoffset.integrations.huggingface`, :mod:`~carbonoffset.integrations.keras`),
each with a ``CarbonOffsetCallback``. Importing this package imports no framework; importing
a framework's module never fails either: without the framework, building its callback raises
:class:`ModuleNotFoundError` naming the package and the extra to install
(``pip install carbonoffset[lightning|transformers|keras]``), with the import error as its cause.

Every callback only translates its framework's events into calls on one shared core, so they
all do the same thing:

* **Run start** (fit / ``train()`` begins): a new ledger run with a fresh CodeCarbon tracker
  (every training call is its own run, unless it resumes one from saved state).
* **Each epoch end**: the run's cumulative figures are recorded in the ledger and, with
  ``log_metrics``, handed to the framework as the ``carbon/*`` metrics
  (:meth:`EpochReport.metrics <carbonoffset.core.session.EpochReport.metrics>`: energy in kWh,
  emissions, offset and pending in kg CO2eq). Once the account's pending emissions reach
  ``offset_threshold`` an offset is bought on a background thread: the epoch never waits for the
  network. With ``max_emissions_kg``, a warning is logged after the first epoch when the
  emissions projected over the planned epochs pass the budget; once the run's emissions pass
  it, a warning is logged and the framework is asked to stop after that epoch.
* **Run end**: final record, final offset (respecting ``offset_threshold``, or rounding up to a
  whole pound with ``offset_round_up``), a wait of at most ``offset_timeout`` seconds for offsets
  in flight; whatever is not settled stays in the ledger for the next run or
  ``carbonoffset reconcile``. The figures are kept in the callback's ``final_report``.
* **Training raises**: the tracker stops and everything measured is kept in the ledger (status
  ``"interrupted"`` for ``KeyboardInterrupt``, ``"failed"`` otherwise), with no final offset;
  what was measured stays pending for a later run. Lightning reports exceptions to callbacks;
  Keras and the Trainer do not, so wrap their training call in the callback's ``guard()``.

Only local rank 0 of each node measures; global rank 0 records and offsets; in a distributed
job the node figures are summed across processes (see ``docs/distributed.md``).

Arguments every ``CarbonOffsetCallback`` takes (documented here once; each callback adds its
framework's own):

    session (OffsetSession | None): a ready :class:`~carbonoffset.core.session.OffsetSession`
        whose settings are used; cannot be combined with ``**settings``. ``None`` (default)
        builds one per run from ``**settings``. A session cannot be pickled: with spawned
        training processes pass settings instead.
    max_emissions_kg (float | None): carbon budget of one run in kg CO2eq (> 0), or ``None``
        (default, no budget).
    log_metrics (bool): hand the ``carbon/*`` metrics to the framework each epoch and at the
        end (default ``True``).
    source (EmissionsSource | None): emissions source for the sessions built here (default:
        CodeCarbon in a measuring process); tests inject
        :class:`carbonoffset.testing.ScriptedEmissions`.
    offsetter_options (dict | None): passed to the offsetter (``max_attempts``,
        ``wait_initial_s``, ``wait_max_s``).
    **settings: :class:`~carbonoffset.core.config.OffsetConfig` fields (see there for types,
        units and valid ranges): ``offset_api_key``, ``offset_environment``,
        ``offset_threshold``, ``auto_offset``, ``offset_ledger``, ``offset_timeout``,
        ``offset_request_timeout``, ``offset_round_up``, ``offset_api_url``,
        ``country_iso_code``. Unset ones come from ``CODECARBON_*`` environment variables and
        ``.codecarbon.config``.

Raises (when the callback is built, before training):

    ValueError: an invalid setting (:class:`~carbonoffset.core.errors.ConfigurationError`,
        naming the setting and the fix), ``max_emissions_kg <= 0``, or both ``session`` and
        settings given.
    LedgerError: the ledger is corrupt, from a newer carbonoffset, or cannot be created.
    ModuleNotFoundError: the framework is not installed (or not importable).
"""
