// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title FalseReturnToken
/// @notice Test token that, once `failing` is set, returns false from transfers instead of reverting.
contract FalseReturnToken is ERC20 {
    bool public failing;

    constructor() ERC20("False Token", "FALSE") {}

    /// @notice Mints `amount` to `to` (tests only).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Makes every later transfer return false without moving funds.
    function setFailing(bool failing_) external {
        failing = failing_;
    }

    /// @inheritdoc ERC20
    function transfer(address to, uint256 value) public override returns (bool) {
        if (failing) return false;
        return super.transfer(to, value);
    }

    /// @inheritdoc ERC20
    function transferFrom(address from, address to, uint256 value) public override returns (bool) {
        if (failing) return false;
        return super.transferFrom(from, to, value);
    }
}
