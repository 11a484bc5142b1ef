"""The online service of raytr: REST recommendations from a model bundle.

    api.py         request/response models (pydantic), event fields built from the data config
    routes.py      the FastAPI app over a Backend: routes, validation, body limit, admin token
    core.py        hand-offs between deployments (light: no torch/NVTabular), bundle versions
    engine.py      Encoder (OnlinePreprocessor), Scorer (SessionModel), LocalBackend (one process)
    app.py         Ray Serve: Ingress -> Preprocessor -> Recommender (+ BundleRegistry), app_builder,
                   start_local / stop_local
    standalone.py  the same routes on uvicorn without Ray (the benchmark's baseline)
    config.yaml    `serve deploy` config
"""
