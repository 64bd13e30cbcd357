"""The benchmark application on the MoECLIP library: params.yaml's plan, the run layout, the pipeline's
stages, MLflow tracking, the report, and the `moeclip` command. The library never imports it."""
