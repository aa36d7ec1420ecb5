"""Puppet-CNN layers and models."""
from official.puppet_cnn.modeling.complexity import InputComplexity
from official.puppet_cnn.modeling.complexity import image_complexity
from official.puppet_cnn.modeling.dynamic_conv_stack import DynamicConvStack
from official.puppet_cnn.modeling.puppet_classifier import PuppetClassifier
from official.puppet_cnn.modeling.puppeteer_ode import PuppeteerODE
