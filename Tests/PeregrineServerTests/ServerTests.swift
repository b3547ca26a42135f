import XCTest
@testable import PeregrineServer
