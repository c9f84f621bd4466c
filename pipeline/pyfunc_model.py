"""The file MLflow logs as the model's code ("models from code"): loading the
registered model runs this file instead of unpickling an object."""

from mlflow.models import set_model

from pipeline.pyfunc import EmarecPyfunc

set_model(EmarecPyfunc())
