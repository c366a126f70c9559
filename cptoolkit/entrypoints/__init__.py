"""The jobs that ``launch/*.py`` and the ``cptoolkit`` command run, one module each: ``infer``, ``serve``, ``train``.

Each module has ``add_arguments`` (its flags besides ``--config``, each named ``--<dest>``, so that parsed
values can be handed on to the ranks as flags again), ``parse_args``, ``check(cfg)`` (what it refuses before any
process group exists, as a ``ConfigError``), ``run(cfg, args)`` (one rank's job), ``main(args)`` (load, check,
run) and ``launch()``; under torchrun every rank runs ``python -m cptoolkit.entrypoints.<job> --config FILE``.
"""
