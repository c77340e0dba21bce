"""medclassify: BloodMNIST and BreastMNIST classifiers, from training to serving."""
__version__ = "0.1.0"
